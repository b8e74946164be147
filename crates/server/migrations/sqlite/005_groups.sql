-- natterd SQLite schema, version 5: groups. Membership lives on the server (the content of group messages
-- never does: it is Megolm ciphertext in the ordinary per-device queue, one row per recipient device).

CREATE TABLE groups (
    id                    BLOB    NOT NULL PRIMARY KEY,  -- 16 bytes
    name                  TEXT    NOT NULL,
    description           TEXT    NOT NULL,
    version               INTEGER NOT NULL,              -- grows by one with every change
    all_members_may_edit  INTEGER NOT NULL,              -- 0 or 1
    created_at_ms         INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- No foreign key to accounts: a member who re-registers stays a member (as the number is the member).
CREATE TABLE group_members (
    group_id          BLOB    NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    phone             TEXT    NOT NULL,
    admin             INTEGER NOT NULL,                  -- 0 or 1
    added_at_version  INTEGER NOT NULL,
    PRIMARY KEY (group_id, phone)
) STRICT, WITHOUT ROWID;
CREATE INDEX group_members_by_phone ON group_members (phone, group_id);
