-- natterd SQLite schema, version 3: app-state sync. Patches and snapshots are opaque encoded protobuf
-- (`AppStatePatch`, `AppStateSnapshot`) the server cannot read; the version of a patch is its row's
-- version column. Only the newest snapshot per collection is kept, and the patches after the previous one.

CREATE TABLE app_state_versions (
    phone       TEXT    NOT NULL,
    collection  TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    PRIMARY KEY (phone, collection)
) STRICT, WITHOUT ROWID;

CREATE TABLE app_state_patches (
    phone       TEXT    NOT NULL,
    collection  TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    patch       BLOB    NOT NULL,
    PRIMARY KEY (phone, collection, version)
) STRICT, WITHOUT ROWID;

CREATE TABLE app_state_snapshots (
    phone       TEXT    NOT NULL,
    collection  TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    snapshot    BLOB    NOT NULL,
    PRIMARY KEY (phone, collection)
) STRICT, WITHOUT ROWID;
