//! Schema migrations, applied in order and recorded in `PRAGMA user_version` (SQLite) or
//! the `vdim_schema` table (PostgreSQL). A migration is never edited once released: add a
//! new one. Each is written once, in SQLite's dialect, which [`for_engine`] maps for
//! PostgreSQL; the few statements the two engines spell differently (triggers) are in
//! [`SQLITE_ONLY`] and [`POSTGRES_ONLY`], by migration.

use super::sql::{postgres_ddl, Engine};

/// Migration `i` (from 0) as `engine` runs it.
pub fn for_engine(i: usize, engine: Engine) -> String {
    let own = |list: &[(usize, &str)]| list.iter().filter(|(m, _)| *m == i).map(|(_, s)| *s).collect::<String>();
    match engine {
        Engine::Sqlite => format!("{}\n{}", MIGRATIONS[i], own(SQLITE_ONLY)),
        Engine::Postgres => format!("{}\n{}", postgres_ddl(MIGRATIONS[i]), own(POSTGRES_ONLY)),
    }
}

/// The audit log is append-only: the database itself refuses to change or remove an entry.
const SQLITE_ONLY: &[(usize, &str)] = &[(
    0,
    r#"
    CREATE TRIGGER audit_is_append_only_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_is_append_only_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    "#,
)];

const POSTGRES_ONLY: &[(usize, &str)] = &[(
    0,
    r#"
    CREATE FUNCTION audit_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
    CREATE TRIGGER audit_is_append_only BEFORE UPDATE OR DELETE ON audit
        FOR EACH ROW EXECUTE FUNCTION audit_is_append_only();
    CREATE TRIGGER audit_is_never_truncated BEFORE TRUNCATE ON audit
        FOR EACH STATEMENT EXECUTE FUNCTION audit_is_append_only();
    "#,
)];

pub const MIGRATIONS: &[&str] = &[
    // 1: the image store.
    r#"
    CREATE TABLE images (
        id           INTEGER PRIMARY KEY,
        name         TEXT NOT NULL UNIQUE,
        created      TEXT NOT NULL,
        virtual_size INTEGER NOT NULL
    );
    CREATE TABLE versions (
        image_id     INTEGER NOT NULL REFERENCES images(id),
        number       INTEGER NOT NULL CHECK (number >= 1),
        parent       INTEGER,
        digest       TEXT NOT NULL CHECK (length(digest) = 64),
        file_size    INTEGER NOT NULL,
        virtual_size INTEGER NOT NULL,
        author       TEXT NOT NULL,
        note         TEXT NOT NULL DEFAULT '',
        created      TEXT NOT NULL,
        status       TEXT NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'failed')),
        removed      TEXT,
        PRIMARY KEY (image_id, number),
        FOREIGN KEY (image_id, parent) REFERENCES versions(image_id, number)
    );
    CREATE INDEX versions_digest ON versions(digest);
    CREATE TABLE channels (
        image_id INTEGER NOT NULL REFERENCES images(id),
        name     TEXT NOT NULL CHECK (name IN ('dev', 'test', 'prod')),
        version  INTEGER NOT NULL,
        PRIMARY KEY (image_id, name),
        FOREIGN KEY (image_id, version) REFERENCES versions(image_id, number)
    );
    -- Every position a channel has held: the rollback window gc must respect.
    CREATE TABLE channel_history (
        id       INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images(id),
        channel  TEXT NOT NULL,
        version  INTEGER NOT NULL,
        at       TEXT NOT NULL,
        FOREIGN KEY (image_id, version) REFERENCES versions(image_id, number)
    );
    CREATE TABLE drafts (
        image_id     INTEGER PRIMARY KEY REFERENCES images(id),
        base_version INTEGER NOT NULL,
        path         TEXT NOT NULL UNIQUE,
        created      TEXT NOT NULL,
        author       TEXT NOT NULL,
        FOREIGN KEY (image_id, base_version) REFERENCES versions(image_id, number)
    );
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY,
        at      TEXT NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        image   TEXT,
        pool    TEXT,
        version INTEGER,
        detail  TEXT NOT NULL DEFAULT '{}'
    );
    "#,
    // 2: pools of desktops.
    r#"
    CREATE TABLE pools (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        image_id    INTEGER NOT NULL REFERENCES images(id),
        channel     TEXT NOT NULL CHECK (channel IN ('dev', 'test', 'prod')),
        version     INTEGER NOT NULL,
        pinned      INTEGER,
        size        INTEGER NOT NULL CHECK (size >= 1),
        profile     TEXT NOT NULL,
        persistent  INTEGER NOT NULL DEFAULT 0,
        virt_type   TEXT NOT NULL CHECK (virt_type IN ('kvm', 'qemu')),
        running     INTEGER NOT NULL DEFAULT 0,
        created     TEXT NOT NULL,
        FOREIGN KEY (image_id, version) REFERENCES versions(image_id, number),
        FOREIGN KEY (image_id, pinned) REFERENCES versions(image_id, number)
    );
    -- Every version a pool has been moved to: "the version it ran before" for rollback.
    CREATE TABLE pool_history (
        id       INTEGER PRIMARY KEY,
        pool_id  INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        version  INTEGER NOT NULL,
        reason   TEXT NOT NULL,
        at       TEXT NOT NULL
    );
    CREATE TABLE desktops (
        id          INTEGER PRIMARY KEY,
        pool_id     INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        idx         INTEGER NOT NULL,
        name        TEXT NOT NULL UNIQUE,
        overlay     TEXT NOT NULL UNIQUE,
        -- The version the overlay sits on (or must be recreated on, when needs_reset).
        version     INTEGER NOT NULL,
        -- Where an in-use desktop goes at logoff.
        target      INTEGER,
        -- 1: the overlay must be recreated before anyone uses or boots the desktop.
        needs_reset INTEGER NOT NULL DEFAULT 0,
        assigned_to TEXT,
        assigned_at TEXT,
        UNIQUE (pool_id, idx)
    );
    "#,
    // 3: canary rollouts of a version to a channel, wave by wave.
    r#"
    CREATE TABLE rollouts (
        id           INTEGER PRIMARY KEY,
        image_id     INTEGER NOT NULL REFERENCES images(id),
        version      INTEGER NOT NULL,
        channel      TEXT NOT NULL CHECK (channel IN ('dev', 'test', 'prod')),
        -- Where the channel pointed before: what a failed rollout goes back to.
        from_version INTEGER NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('running', 'halted', 'succeeded', 'failed', 'reverted')),
        waves        TEXT NOT NULL,
        soak_ms      INTEGER NOT NULL,
        wave         INTEGER NOT NULL DEFAULT 0,
        actor        TEXT NOT NULL,
        forced       TEXT,
        owner_pid    INTEGER,
        created      TEXT NOT NULL,
        updated      TEXT NOT NULL,
        report       TEXT NOT NULL DEFAULT '{}',
        FOREIGN KEY (image_id, version) REFERENCES versions(image_id, number)
    );
    CREATE TABLE rollout_desktops (
        rollout_id   INTEGER NOT NULL REFERENCES rollouts(id),
        desktop      TEXT NOT NULL,
        pool         TEXT NOT NULL,
        wave         INTEGER NOT NULL,
        from_version INTEGER NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('pending', 'moving', 'soaking', 'healthy', 'failed', 'reverted', 'skipped')),
        detail       TEXT NOT NULL DEFAULT '',
        at           TEXT NOT NULL,
        PRIMARY KEY (rollout_id, desktop)
    );
    "#,
    // 4: thin-client users, entitlements and sessions.
    r#"
    CREATE TABLE users (
        id            INTEGER PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        admin         INTEGER NOT NULL DEFAULT 0,
        -- SHA-256 (hex) of the bearer token; the token itself is shown once and never stored.
        token_hash    TEXT NOT NULL UNIQUE CHECK (length(token_hash) = 64),
        token_expires TEXT,
        created       TEXT NOT NULL
    );
    CREATE TABLE entitlements (
        pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        PRIMARY KEY (pool_id, user_id)
    );
    CREATE TABLE sessions (
        id                 TEXT PRIMARY KEY CHECK (length(id) = 32),
        user_id            INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        pool               TEXT NOT NULL,
        desktop            TEXT NOT NULL,
        created            TEXT NOT NULL,
        expires_at         TEXT NOT NULL,
        ended              TEXT,
        -- Set once the logoff is complete (desktop released and reset where due). An ended
        -- session without it is finished by the broker's reaper and at its start.
        released           TEXT,
        -- SHA-256 (hex) of the per-session console token (HTML5 console).
        console_token_hash TEXT NOT NULL CHECK (length(console_token_hash) = 64)
    );
    -- The database itself refuses a desktop in two open sessions, and a second open session
    -- of one user in one pool (the broker reconnects to the first instead).
    CREATE UNIQUE INDEX sessions_open_desktop ON sessions(desktop) WHERE ended IS NULL;
    CREATE UNIQUE INDEX sessions_open_user_pool ON sessions(user_id, pool) WHERE ended IS NULL;
    CREATE INDEX sessions_unreleased ON sessions(ended) WHERE released IS NULL;
    "#,
    // 5: the address a pool's desktop displays (SPICE, VNC) listen on. Pools made before
    // listen on loopback, as they always did.
    r#"
    ALTER TABLE pools ADD COLUMN display_listen TEXT NOT NULL DEFAULT '127.0.0.1';
    "#,
    // 6: a pool whose displays are plaintext off loopback (`--insecure-display`). Pools made
    // before with an off-loopback address were plaintext, and say so now.
    r#"
    ALTER TABLE pools ADD COLUMN insecure_display INTEGER NOT NULL DEFAULT 0;
    UPDATE pools SET insecure_display = 1 WHERE display_listen NOT LIKE '127.%' AND display_listen <> '::1';
    "#,
    // 7: per-desktop identity (config drive). A pool has one when hostname_pattern is set;
    // join_credentials is the path of a file on this host, never its contents. Desktops get
    // the domain UUID vdim chose, which their drive states.
    r#"
    ALTER TABLE pools ADD COLUMN hostname_pattern TEXT;
    ALTER TABLE pools ADD COLUMN join_domain TEXT;
    ALTER TABLE pools ADD COLUMN join_ou TEXT;
    ALTER TABLE pools ADD COLUMN join_credentials TEXT;
    ALTER TABLE pools ADD COLUMN user_data TEXT;
    ALTER TABLE desktops ADD COLUMN uuid TEXT;
    "#,
    // 8: libvirt hosts and the layers each holds verified. A home without hosts drives the
    // one libvirt of `--connect`, as before. A host's layer store is a directory storage pool
    // there; a layer counts on a host only once read back from it with its SHA-256.
    r#"
    CREATE TABLE hosts (
        id            INTEGER PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        uri           TEXT NOT NULL UNIQUE,
        zone          TEXT,
        max_desktops  INTEGER CHECK (max_desktops IS NULL OR max_desktops >= 0),
        storage_pool  TEXT NOT NULL,
        store_path    TEXT NOT NULL,
        state         TEXT NOT NULL DEFAULT 'up' CHECK (state IN ('up', 'draining', 'fenced')),
        added         TEXT NOT NULL
    );
    CREATE TABLE host_layers (
        host_id     INTEGER NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        digest      TEXT NOT NULL CHECK (length(digest) = 64),
        verified_at TEXT NOT NULL,
        PRIMARY KEY (host_id, digest)
    );
    "#,
    // 9: desktops placed on hosts. A desktop without a host runs on the one libvirt of
    // `--connect` with its files in the home, as before; one with a host has its overlay in
    // that host's desktop store. A pool's hosts are where its desktops may go. A host's
    // liveness: probes answered (`seen`) and missed in a row; its fence command (run when it
    // stops answering) and when it was fenced.
    r#"
    ALTER TABLE desktops ADD COLUMN host_id INTEGER REFERENCES hosts(id);
    CREATE INDEX desktops_host ON desktops(host_id);
    CREATE TABLE pool_hosts (
        pool_id  INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
        host_id  INTEGER NOT NULL REFERENCES hosts(id),
        PRIMARY KEY (pool_id, host_id)
    );
    ALTER TABLE hosts ADD COLUMN fence_command TEXT;
    ALTER TABLE hosts ADD COLUMN seen TEXT;
    ALTER TABLE hosts ADD COLUMN missed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE hosts ADD COLUMN fenced_at TEXT;
    "#,
    // 10: several brokers on one catalog. `leases`: the leader lease (one row, `leader`) that
    // decides which broker runs the background duties; `term` grows at every takeover. A
    // rollout's driver renews `owner` (host:pid:suffix) and `owner_seen_ms` while it runs,
    // so the leader can tell a driver that died on another machine. Milliseconds since the
    // epoch, from the writer's clock.
    r#"
    CREATE TABLE leases (
        name       TEXT PRIMARY KEY,
        holder     TEXT NOT NULL,
        term       BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL
    );
    ALTER TABLE rollouts ADD COLUMN owner TEXT;
    ALTER TABLE rollouts ADD COLUMN owner_seen_ms BIGINT;
    "#,
    // 11: which console of a session is the current one, whichever broker proxies it: each
    // new console takes the next number, and every broker closes its older ones.
    r#"
    ALTER TABLE sessions ADD COLUMN console_generation INTEGER NOT NULL DEFAULT 0;
    "#,
    // 12: the fleet watch. What it saw of each desktop (crash, reboot loop, unexpected stop,
    // silent guest agent) against the desktop's pool, version and host at the time, one row
    // per happening (the same crash seen twice is one row); each channel's breaker policy;
    // incidents the breaker opened, with their review (times in milliseconds since the epoch);
    // desktops crashed now.
    r#"
    CREATE TABLE watch_events (
        id       INTEGER PRIMARY KEY,
        desktop  TEXT NOT NULL,
        pool     TEXT NOT NULL,
        image    TEXT NOT NULL,
        version  INTEGER NOT NULL,
        channel  TEXT NOT NULL CHECK (channel IN ('dev', 'test', 'prod')),
        host     TEXT NOT NULL,
        kind     TEXT NOT NULL CHECK (kind IN ('crash', 'reboot_loop', 'stop', 'agent_silent')),
        detail   TEXT NOT NULL,
        at_ms    BIGINT NOT NULL,
        seen_ms  BIGINT NOT NULL,
        UNIQUE (desktop, kind, at_ms)
    );
    CREATE INDEX watch_events_version ON watch_events(image, version, at_ms);
    CREATE TABLE watch_policies (
        channel   TEXT PRIMARY KEY CHECK (channel IN ('dev', 'test', 'prod')),
        crashes   INTEGER NOT NULL CHECK (crashes >= 2),
        share     INTEGER CHECK (share IS NULL OR (share >= 1 AND share <= 100)),
        within_ms BIGINT NOT NULL CHECK (within_ms > 0),
        action    TEXT NOT NULL CHECK (action IN ('rollback', 'alert')),
        updated   TEXT NOT NULL
    );
    CREATE TABLE incidents (
        id                 INTEGER PRIMARY KEY,
        image              TEXT NOT NULL,
        version            INTEGER NOT NULL,
        channel            TEXT NOT NULL CHECK (channel IN ('dev', 'test', 'prod')),
        action             TEXT NOT NULL CHECK (action IN ('rollback', 'alert')),
        state              TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
        opened_ms          BIGINT NOT NULL,
        first_crash_ms     BIGINT NOT NULL,
        threshold_crash_ms BIGINT NOT NULL,
        restored_ms        BIGINT,
        resolved_ms        BIGINT,
        note               TEXT,
        acked_by           TEXT,
        acked_ms           BIGINT,
        report             TEXT NOT NULL DEFAULT '{}',
        UNIQUE (image, version, channel)
    );
    -- Desktops crashed since they last started (the watch adds and removes them).
    CREATE TABLE crashed_desktops (
        desktop  TEXT PRIMARY KEY,
        at_ms    BIGINT NOT NULL
    );
    "#,
];
