-- natterd PostgreSQL schema, version 4: contacts, encrypted profiles, privacy settings and blocks (as
-- sqlite/004_social.sql). Only accounts appear here: discovery never writes a number that is not
-- registered.

CREATE TABLE contacts (
    owner    TEXT NOT NULL,
    contact  TEXT NOT NULL,
    PRIMARY KEY (owner, contact)
);

CREATE TABLE profiles (
    phone       TEXT   NOT NULL PRIMARY KEY,
    ciphertext  BYTEA  NOT NULL,
    updated_ms  BIGINT NOT NULL
);

-- An account without a row has the defaults (last seen: everyone; receipts on).
CREATE TABLE privacy (
    phone              TEXT    NOT NULL PRIMARY KEY,
    last_seen          BIGINT  NOT NULL,
    read_receipts_off  BOOLEAN NOT NULL
);

CREATE TABLE blocks (
    owner    TEXT NOT NULL,
    blocked  TEXT NOT NULL,
    PRIMARY KEY (owner, blocked)
);
