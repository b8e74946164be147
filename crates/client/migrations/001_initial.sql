-- natter-client SQLite schema, version 1. Applied once, in one transaction, by SqliteStore::open.
-- Every u64 of the ClientStore API is stored as INTEGER (i64): timestamps in ms and versions fit;
-- SqliteStore rejects values above i64::MAX on write. STRICT tables enforce the column types.
-- Phone numbers are E.164 TEXT, device ids INTEGER, message ids 16-byte BLOBs, keys 32-byte BLOBs,
-- booleans INTEGER 0/1, enums short TEXT ('text', 'pending', 'queued', ...). Lengths and enum values
-- are checked on read (a bad row is StoreError::Corrupt), not here: a new enum value must not need a
-- table rebuild.

-- This device's identity: at most one row (id = 1).
CREATE TABLE identity (
    id              INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    phone           TEXT    NOT NULL,
    device_id       INTEGER NOT NULL,
    registered      INTEGER NOT NULL,
    account_key     BLOB    NOT NULL,
    account_secret  BLOB,
    device_pickle   TEXT    NOT NULL,
    noise_secret    BLOB    NOT NULL,
    device_name     TEXT    NOT NULL
) STRICT;

-- Small settings: key -> opaque bytes.
CREATE TABLE settings (
    key    TEXT NOT NULL PRIMARY KEY,
    value  BLOB NOT NULL
) STRICT, WITHOUT ROWID;

-- Olm sessions, several per peer device; the most recently used one is used for sending.
CREATE TABLE sessions (
    phone         TEXT    NOT NULL,
    device_id     INTEGER NOT NULL,
    session_id    TEXT    NOT NULL,
    pickle        TEXT    NOT NULL,
    last_used_ms  INTEGER NOT NULL,
    PRIMARY KEY (phone, device_id, session_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX sessions_by_use ON sessions (phone, device_id, last_used_ms DESC, session_id);

CREATE TABLE peers (
    phone                TEXT    NOT NULL PRIMARY KEY,
    account_key          BLOB    NOT NULL,
    device_list          BLOB    NOT NULL,
    device_list_version  INTEGER NOT NULL,
    key_changed_at_ms    INTEGER
) STRICT, WITHOUT ROWID;

-- Conversations. `seq` is the insertion order (history and unshown are ordered by it). AUTOINCREMENT: a
-- seq is never handed out twice, even if the newest rows are ever deleted. (chat, id) is the message's
-- identity; inserts use ON CONFLICT (chat, id) DO NOTHING so a redelivered message changes nothing.
CREATE TABLE messages (
    seq            INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    chat           TEXT    NOT NULL,
    id             BLOB    NOT NULL,
    from_me        INTEGER NOT NULL,
    sender_device  INTEGER NOT NULL,
    kind           TEXT    NOT NULL,
    text           TEXT    NOT NULL,
    sent_at_ms     INTEGER NOT NULL,
    server_ts_ms   INTEGER NOT NULL,
    status         TEXT    NOT NULL,
    shown          INTEGER NOT NULL,
    UNIQUE (chat, id)
) STRICT;
CREATE INDEX messages_by_chat ON messages (chat, seq);
CREATE INDEX messages_unshown ON messages (seq) WHERE shown = 0;

-- Messages to send (state 'queued') or sent and kept for retry requests ('sent'). The implicit rowid is
-- the tie-break among equal created_ms ("oldest first"); upserts keep it (ON CONFLICT DO UPDATE, never
-- INSERT OR REPLACE, which deletes and re-inserts the row with a new rowid).
CREATE TABLE outbox (
    transport_id   BLOB    NOT NULL PRIMARY KEY,
    logical_id     BLOB    NOT NULL,
    peer           TEXT    NOT NULL,
    content        BLOB    NOT NULL,
    only_phone     TEXT,
    only_device    INTEGER,
    retry_of       BLOB,
    retry_attempt  INTEGER NOT NULL,
    created_ms     INTEGER NOT NULL,
    state          TEXT    NOT NULL,
    CHECK ((only_phone IS NULL) = (only_device IS NULL))
) STRICT;
CREATE INDEX outbox_queued ON outbox (created_ms) WHERE state = 'queued';

-- Envelopes already handled: a redelivery is only acknowledged.
CREATE TABLE processed (
    sender        TEXT NOT NULL,
    transport_id  BLOB NOT NULL,
    PRIMARY KEY (sender, transport_id)
) STRICT, WITHOUT ROWID;

-- Envelopes that did not decrypt, while their sender is asked to try again.
CREATE TABLE failures (
    sender         TEXT    NOT NULL,
    sender_device  INTEGER NOT NULL,
    original_id    BLOB    NOT NULL,
    attempts       INTEGER NOT NULL,
    server_ts_ms   INTEGER NOT NULL,
    PRIMARY KEY (sender, original_id)
) STRICT, WITHOUT ROWID;
