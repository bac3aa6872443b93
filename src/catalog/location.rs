//! Where the catalog is: a SQLite file (the default, in the home) or a PostgreSQL database
//! (`--catalog postgres://user@db1/vdim`, or `VDIM_CATALOG`).

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    /// A `postgres://` (or `postgresql://`) URL, as libpq takes it.
    Postgres(String),
}

impl Location {
    /// A `postgres://` or `postgresql://` URL is a PostgreSQL database; anything else is
    /// the path of a SQLite file.
    pub fn parse(s: &str) -> Location {
        let lower = s.get(..13).unwrap_or(s).to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            Location::Postgres(s.to_string())
        } else {
            Location::Sqlite(PathBuf::from(s))
        }
    }

    pub fn engine(&self) -> super::sql::Engine {
        match self {
            Location::Sqlite(_) => super::sql::Engine::Sqlite,
            Location::Postgres(_) => super::sql::Engine::Postgres,
        }
    }
}

/// Shown in messages and logs: a URL's password never is.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => f.write_str(&redacted(url)),
        }
    }
}

/// `postgres://user:secret@host/db?password=x` as `postgres://user:***@host/db?password=***`.
fn redacted(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_postgres_and_paths_sqlite() {
        assert_eq!(Location::parse("postgres://a@b/c"), Location::Postgres("postgres://a@b/c".into()));
        assert_eq!(Location::parse("PostgreSQL://a@b/c"), Location::Postgres("PostgreSQL://a@b/c".into()));
        assert_eq!(Location::parse("/var/lib/vdim/catalog.db"), Location::Sqlite("/var/lib/vdim/catalog.db".into()));
        assert_eq!(Location::parse("postgres"), Location::Sqlite("postgres".into()));
    }

    #[test]
    fn a_password_is_never_shown() {
        let l = Location::parse("postgres://vdim:s3cret@db1:5432/vdim?sslmode=require&password=x2");
        let shown = l.to_string();
        assert_eq!(shown, "postgres://vdim:***@db1:5432/vdim?sslmode=require&password=***");
        assert!(!shown.contains("s3cret") && !shown.contains("x2"));
        assert_eq!(Location::parse("postgres://vdim@db1/vdim").to_string(), "postgres://vdim@db1/vdim");
    }
}
