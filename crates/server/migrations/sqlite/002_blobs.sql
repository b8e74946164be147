-- natterd SQLite schema, version 2: media blob records. The bytes live in the blob store
-- (data_dir/blobs) or, while uploading, in data_dir/blobs-partial/{id}; only sizes and times are here.

CREATE TABLE blobs (
    id             TEXT    NOT NULL PRIMARY KEY,  -- 32 lowercase hex digits
    owner          TEXT    NOT NULL,              -- uploader's E.164 number (no foreign key: blobs
                                                  -- outlive a re-registration until they expire)
    size           INTEGER NOT NULL,
    uploaded       INTEGER NOT NULL,              -- bytes received so far
    complete       INTEGER NOT NULL,              -- 0 or 1
    created_at_ms  INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX blobs_by_owner ON blobs (owner, expires_at_ms);
CREATE INDEX blobs_by_expiry ON blobs (expires_at_ms);
