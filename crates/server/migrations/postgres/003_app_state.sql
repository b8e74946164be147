-- natterd PostgreSQL schema, version 3: app-state sync (as sqlite/003_app_state.sql). Patches and
-- snapshots are opaque encoded protobuf; only the newest snapshot per collection is kept, and the
-- patches after the previous one.

CREATE TABLE app_state_versions (
    phone       TEXT   NOT NULL,
    collection  TEXT   NOT NULL,
    version     BIGINT NOT NULL,
    PRIMARY KEY (phone, collection)
);

CREATE TABLE app_state_patches (
    phone       TEXT   NOT NULL,
    collection  TEXT   NOT NULL,
    version     BIGINT NOT NULL,
    patch       BYTEA  NOT NULL,
    PRIMARY KEY (phone, collection, version)
);

CREATE TABLE app_state_snapshots (
    phone       TEXT   NOT NULL,
    collection  TEXT   NOT NULL,
    version     BIGINT NOT NULL,
    snapshot    BYTEA  NOT NULL,
    PRIMARY KEY (phone, collection)
);
