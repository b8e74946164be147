-- natterd SQLite schema, version 4: contacts, encrypted profiles, privacy settings and blocks.
-- Only accounts appear here: discovery never writes a number that is not registered.

-- Which registered accounts are in an account's address book (privacy setting "contacts").
CREATE TABLE contacts (
    owner    TEXT NOT NULL,
    contact  TEXT NOT NULL,
    PRIMARY KEY (owner, contact)
) STRICT, WITHOUT ROWID;

-- An account's profile, encrypted with its profile key: the server cannot read it.
CREATE TABLE profiles (
    phone       TEXT    NOT NULL PRIMARY KEY,
    ciphertext  BLOB    NOT NULL,
    updated_ms  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Privacy settings; an account without a row has the defaults (last seen: everyone; receipts on).
CREATE TABLE privacy (
    phone              TEXT    NOT NULL PRIMARY KEY,
    last_seen          INTEGER NOT NULL,
    read_receipts_off  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Who blocked whom.
CREATE TABLE blocks (
    owner    TEXT NOT NULL,
    blocked  TEXT NOT NULL,
    PRIMARY KEY (owner, blocked)
) STRICT, WITHOUT ROWID;
