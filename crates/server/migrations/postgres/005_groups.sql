-- natterd PostgreSQL schema, version 5: groups (as sqlite/005_groups.sql). Membership lives on the
-- server; the content of group messages never does (it is Megolm ciphertext in the ordinary per-device
-- queue, one row per recipient device).

CREATE TABLE groups (
    id                    BYTEA   NOT NULL PRIMARY KEY,  -- 16 bytes
    name                  TEXT    NOT NULL,
    description           TEXT    NOT NULL,
    version               BIGINT  NOT NULL,              -- grows by one with every change
    all_members_may_edit  BOOLEAN NOT NULL,
    created_at_ms         BIGINT  NOT NULL
);

-- No foreign key to accounts: a member who re-registers stays a member (the number is the member).
CREATE TABLE group_members (
    group_id          BYTEA   NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    phone             TEXT    NOT NULL,
    admin             BOOLEAN NOT NULL,
    added_at_version  BIGINT  NOT NULL,
    PRIMARY KEY (group_id, phone)
);
CREATE INDEX group_members_by_phone ON group_members (phone, group_id);
