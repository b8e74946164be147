-- natterd SQLite schema, version 1. Applied once, in one transaction, by SqliteStore::open.
-- Every u64 of the Store API is stored as INTEGER (i64): timestamps in ms, seqs and versions fit;
-- SqliteStore rejects values above i64::MAX on write. STRICT tables enforce the column types.

-- Pending registration codes: one per number, replaced on resend.
CREATE TABLE codes (
    phone          TEXT    NOT NULL PRIMARY KEY,
    code_hash      BLOB    NOT NULL,
    sent_at_ms     INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    attempts       INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE accounts (
    phone                TEXT    NOT NULL PRIMARY KEY,
    account_key          BLOB    NOT NULL,
    device_list          BLOB    NOT NULL,
    device_list_version  INTEGER NOT NULL,
    created_at_ms        INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE devices (
    phone         TEXT    NOT NULL REFERENCES accounts (phone) ON DELETE CASCADE,
    device_id     INTEGER NOT NULL,
    noise_key     BLOB    NOT NULL,
    identity_ed   BLOB    NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    PRIMARY KEY (phone, device_id)
) STRICT, WITHOUT ROWID;

-- One-time keys. `id` is the insertion order ("claim the oldest first"). A plain rowid is enough here:
-- SQLite only reuses a rowid above every existing one, so order among the rows present stays right.
CREATE TABLE one_time_keys (
    id         INTEGER NOT NULL PRIMARY KEY,
    phone      TEXT    NOT NULL,
    device_id  INTEGER NOT NULL,
    key_id     TEXT    NOT NULL,
    key        BLOB    NOT NULL,
    signature  BLOB    NOT NULL,
    UNIQUE (phone, device_id, key_id),
    FOREIGN KEY (phone, device_id) REFERENCES devices (phone, device_id) ON DELETE CASCADE
) STRICT;
CREATE INDEX one_time_keys_by_device ON one_time_keys (phone, device_id, id);

CREATE TABLE fallback_keys (
    phone      TEXT    NOT NULL,
    device_id  INTEGER NOT NULL,
    key_id     TEXT    NOT NULL,
    key        BLOB    NOT NULL,
    signature  BLOB    NOT NULL,
    PRIMARY KEY (phone, device_id),
    FOREIGN KEY (phone, device_id) REFERENCES devices (phone, device_id) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;

-- Envelopes waiting for their device. AUTOINCREMENT: a seq is never handed out twice, even after the
-- newest rows were acknowledged and deleted (a plain rowid would reuse max(seq)+1, and a device that
-- remembers "I have everything up to seq N" would then skip or re-ack a new envelope).
CREATE TABLE queue (
    seq            INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    phone          TEXT    NOT NULL,
    device_id      INTEGER NOT NULL,
    sender         TEXT    NOT NULL,
    sender_device  INTEGER NOT NULL,
    message_id     BLOB    NOT NULL,
    server_ts_ms   INTEGER NOT NULL,
    olm_type       INTEGER NOT NULL,
    ciphertext     BLOB    NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    retry_of       BLOB,
    retry_attempt  INTEGER NOT NULL DEFAULT 0,
    FOREIGN KEY (phone, device_id) REFERENCES devices (phone, device_id) ON DELETE CASCADE
) STRICT;
CREATE INDEX queue_by_device ON queue (phone, device_id, seq);
CREATE INDEX queue_by_expiry ON queue (expires_at_ms);

-- Idempotency: one row per accepted (sender, sender device, message id), kept until the message expires.
CREATE TABLE message_ids (
    sender         TEXT    NOT NULL,
    sender_device  INTEGER NOT NULL,
    message_id     BLOB    NOT NULL,
    server_ts_ms   INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (sender, sender_device, message_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX message_ids_by_expiry ON message_ids (expires_at_ms);
