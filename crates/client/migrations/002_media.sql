-- natter-client SQLite schema, version 2: media messages and resumable uploads.

-- A media message's details: the encoded natter `Media` content whose `key` field holds the media key
-- encrypted with the store cipher. NULL for every other kind of message.
ALTER TABLE messages ADD COLUMN media BLOB;

-- Uploads in progress, one per (peer, file path), kept until the media message is queued so that an
-- interrupted send of the same file resumes. `sealed_key` is the media key encrypted with the store
-- cipher; `kind` is the MediaKind number.
CREATE TABLE uploads (
    peer        TEXT    NOT NULL,
    path        TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    mtime_ms    INTEGER NOT NULL,
    blob_id     TEXT    NOT NULL,
    sealed_key  BLOB    NOT NULL,
    kind        INTEGER NOT NULL,
    caption     TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (peer, path)
) STRICT, WITHOUT ROWID;
