-- natterd PostgreSQL schema, version 2: media blob records (as sqlite/002_blobs.sql). The bytes live in
-- the blob store; only sizes and times are here. `owner` has no foreign key on purpose: blobs outlive a
-- re-registration until they expire.

CREATE TABLE blobs (
    id             TEXT    NOT NULL PRIMARY KEY,  -- 32 lowercase hex digits
    owner          TEXT    NOT NULL,              -- uploader's E.164 number
    size           BIGINT  NOT NULL,
    uploaded       BIGINT  NOT NULL,              -- bytes received so far
    complete       BOOLEAN NOT NULL,
    created_at_ms  BIGINT  NOT NULL,
    expires_at_ms  BIGINT  NOT NULL
);

CREATE INDEX blobs_by_owner ON blobs (owner, expires_at_ms);
CREATE INDEX blobs_by_expiry ON blobs (expires_at_ms);
