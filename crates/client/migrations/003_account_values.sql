-- natter-client SQLite schema, version 3: account-scoped values.

-- Small values that belong to the account on this device (app-state sync keys and collection states,
-- pending background jobs such as history chunks to import). Unlike `settings` (the device's
-- configuration), a wipe deletes them. Values that need it are encrypted with the store cipher by the
-- client before they get here.
CREATE TABLE account_values (
    key   TEXT NOT NULL PRIMARY KEY,
    value BLOB NOT NULL
) STRICT, WITHOUT ROWID;

-- App state was kept among the settings before version 3.
INSERT INTO account_values (key, value) SELECT key, value FROM settings WHERE key LIKE 'appstate/%';
DELETE FROM settings WHERE key LIKE 'appstate/%';
