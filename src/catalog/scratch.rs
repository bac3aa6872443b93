//! Scratch PostgreSQL databases for tests and benches: one made per use on the cluster that
//! `scripts/postgres` runs, dropped (connections and all) when it goes out of scope.

use std::time::Duration;

/// Where `scripts/postgres` keeps the cluster's password (root only).
const PASSWORD_FILE: &str = "/var/lib/vdim-test-pg/password";

/// The cluster's admin URL: `VDIM_TEST_POSTGRES`, or the one `scripts/postgres` made.
pub fn admin_url() -> String {
    if let Ok(url) = std::env::var("VDIM_TEST_POSTGRES") {
        return url;
    }
    let port = std::env::var("VDIM_PG_PORT").unwrap_or_else(|_| "5439".into());
    let password = std::fs::read_to_string(PASSWORD_FILE).unwrap_or_else(|e| {
        panic!("no PostgreSQL for the catalog tests ({PASSWORD_FILE}: {e}): run scripts/postgres start (scripts/setup-host does)")
    });
    format!("postgres://postgres:{}@127.0.0.1:{port}/postgres", password.trim())
}

/// A database of its own, dropped on drop.
pub struct ScratchDatabase {
    admin: String,
    name: String,
    pub url: String,
}

impl ScratchDatabase {
    pub fn new() -> ScratchDatabase {
        let admin = admin_url();
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).expect("random bytes");
        let name = format!("vdim_t_{}", hex::encode(b));
        let mut c = client(&admin);
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let url = match admin.rsplit_once('/') {
            Some((server, db)) => {
                let query = db.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
                format!("{server}/{name}{query}")
            }
            None => panic!("an admin URL without a database: {admin}"),
        };
        ScratchDatabase { admin, name, url }
    }
}

impl ScratchDatabase {
    /// The database lost and made again empty (a disaster recovery drill).
    pub fn wipe(&self) {
        let mut c = client(&self.admin);
        // Each in a statement of its own: neither runs inside a transaction block.
        for sql in [format!("DROP DATABASE {} WITH (FORCE)", self.name), format!("CREATE DATABASE {}", self.name)] {
            c.batch_execute(&sql).unwrap_or_else(|e| panic!("wiping {}: {sql}: {e:?}", self.name));
        }
    }
}

impl Default for ScratchDatabase {
    fn default() -> ScratchDatabase {
        ScratchDatabase::new()
    }
}

fn client(url: &str) -> postgres::Client {
    let mut config: postgres::Config = url.parse().expect("a PostgreSQL URL");
    config.connect_timeout(Duration::from_secs(10));
    config
        .connect(postgres::NoTls)
        .unwrap_or_else(|e| panic!("PostgreSQL for the tests does not answer ({e}): run scripts/postgres start"))
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let mut c = client(&self.admin);
        if let Err(e) = c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)) {
            eprintln!("dropping the scratch database {}: {e}", self.name);
        }
    }
}
