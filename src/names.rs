//! Names of images, pools and users: one rule everywhere, checked at the edge; and every
//! name vdim derives from them (libvirt domains, run directories, lock files), made here only.
//!
//! Names become file names, domain names and XML text, so the alphabet is small on purpose:
//! no path separators, no quotes, nothing a shell or an XML parser would read as syntax.
//!
//! Derived names live in disjoint namespaces, so no pool, index and image can ever share one:
//!
//! | what                 | pool desktops           | dev desktops               | why disjoint                                   |
//! |----------------------|-------------------------|----------------------------|------------------------------------------------|
//! | libvirt domain       | `vdim-<pool>-<nnn>`     | `vdim-dev-<image>-draft`   | a desktop ends in `-` and 3 digits, a dev one in `-draft` |
//! | run directory        | `run/<pool>/`           | `run/_dev/`                | a pool name never starts with `_`              |
//! | lock file            | `locks/pool-<pool>`     | `locks/image-<image>`      | distinct prefixes (also `rollout-`, `store`)   |
//!
//! Before this scheme a dev desktop was `vdim-dev-<image>` in `run/dev/` (pool `dev`'s first
//! desktop and image `001`'s dev desktop were one domain); [`legacy_dev_domain`] lets vdim
//! still find such a dev desktop after an upgrade.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "{kind} name '{name}' is not allowed: use 1 to 63 characters from a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
    )]
    Invalid { kind: &'static str, name: String },
}

impl crate::error::Kind for NameError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            NameError::Invalid { .. } => K::Invalid,
        }
    }
}

/// Check `name` against `[a-z0-9][a-z0-9._-]{0,62}`; `kind` ("image", "pool", ...) names it in errors.
pub fn validate(kind: &'static str, name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid {
            kind,
            // Keep the message one printable line even for hostile input.
            name: name.escape_default().to_string(),
        })
    }
}

/// Desktop indexes have three digits.
pub const MAX_DESKTOP_INDEX: u32 = 999;

/// The libvirt domain of desktop `index` (1 to 999) of `pool`.
pub fn desktop_domain(pool: &str, index: u32) -> String {
    debug_assert!((1..=MAX_DESKTOP_INDEX).contains(&index));
    format!("vdim-{pool}-{index:03}")
}

/// Is `domain` one of `pool`'s desktops by name (and not a desktop of pool "<pool>-x")?
pub fn is_desktop_of(pool: &str, domain: &str) -> bool {
    domain
        .strip_prefix("vdim-")
        .and_then(|r| r.strip_prefix(pool))
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|n| n.len() == 3 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `domain` is named like some pool's desktop (`vdim-<pool>-<nnn>`).
pub fn is_desktop_domain(domain: &str) -> bool {
    domain
        .strip_prefix("vdim-")
        .and_then(|r| r.rsplit_once('-'))
        .is_some_and(|(pool, n)| !pool.is_empty() && n.len() == 3 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The libvirt domain of `image`'s dev desktop; never ends like a pool desktop's.
pub fn dev_domain(image: &str) -> String {
    format!("vdim-dev-{image}-draft")
}

/// The name older vdim versions gave `image`'s dev desktop. It may also be a pool desktop
/// (pool `dev`, image `001`): callers check the catalog before treating it as a dev desktop.
pub fn legacy_dev_domain(image: &str) -> String {
    format!("vdim-dev-{image}")
}

/// A pool's directory under `run/` (serial logs of its desktops).
pub fn pool_run_dir(pool: &str) -> &str {
    pool
}

/// The dev desktops' directory under `run/`; `_` starts no pool name.
pub const DEV_RUN_DIR: &str = "_dev";

/// Lock file keys (`locks/<key>.lock`): one namespace per kind of object.
pub fn image_lock(image: &str) -> String {
    format!("image-{image}")
}
pub fn pool_lock(pool: &str) -> String {
    format!("pool-{pool}")
}
pub fn rollout_lock(image: &str) -> String {
    format!("rollout-{image}")
}
pub const STORE_LOCK: &str = "store";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desktop_domains_are_told_from_other_domains() {
        for d in ["vdim-finance-001", "vdim-a-b-120"] {
            assert!(is_desktop_domain(d), "{d}");
        }
        for d in ["vdim-dev-img-draft", "vdim--001", "vdim-x-01", "other-x-001", "vdim-x-0a1"] {
            assert!(!is_desktop_domain(d), "{d}");
        }
    }

    #[test]
    fn accepts_the_documented_alphabet() {
        for n in ["a", "win11-office", "w.10_x-2", "0abc", &"a".repeat(63)] {
            assert_eq!(validate("image", n), Ok(()), "{n}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for n in ["", "-a", ".a", "_a", "A", "a/b", "../x", "a b", "a'b", "a<b", "ä", "a\n", &"a".repeat(64)] {
            assert!(validate("image", n).is_err(), "{n:?} must be refused");
        }
    }

    #[test]
    fn error_names_the_kind_and_the_name() {
        let e = validate("pool", "Bad/Name").unwrap_err().to_string();
        assert!(e.contains("pool name 'Bad/Name'"), "{e}");
    }

    /// Every name of up to 4 characters over an alphabet that includes the separators and
    /// the words the schemes use: no two objects share a domain, run directory or lock.
    #[test]
    fn no_pool_index_and_image_share_a_domain_run_dir_or_lock() {
        let alphabet = ['d', 'e', 'v', '0', '1', '-', '.', 'r'];
        let mut names = vec![String::new()];
        let mut all = vec![];
        for _ in 0..4 {
            names = names.iter().flat_map(|n| alphabet.iter().map(move |c| format!("{n}{c}"))).collect();
            all.extend(names.iter().filter(|n| validate("pool", n).is_ok()).cloned());
        }
        all.extend(["dev", "dev-001", "001", "001-draft", "dev-x", "x-001"].map(String::from));
        let mut domains = std::collections::HashMap::new();
        let mut locks = std::collections::HashMap::new();
        let mut runs = std::collections::HashMap::new();
        for n in &all {
            for i in [1, 2, 10, 100, 999] {
                let d = desktop_domain(n, i);
                assert!(is_desktop_of(n, &d));
                if let Some(other) = domains.insert(d.clone(), format!("pool {n} #{i}")) {
                    assert_eq!(other, format!("pool {n} #{i}"), "{d}");
                }
            }
            let d = dev_domain(n);
            // Not the desktop of any pool at any index, enumerated or not.
            let as_desktop = d.strip_prefix("vdim-").and_then(|r| r.len().checked_sub(4).map(|k| r.split_at(k)));
            if let Some((pool, index)) = as_desktop {
                let digits = index.strip_prefix('-').is_some_and(|i| i.bytes().all(|b| b.is_ascii_digit()));
                assert!(!(digits && validate("pool", pool).is_ok()), "{d} is pool {pool}'s desktop {index}");
            }
            if let Some(other) = domains.insert(d.clone(), format!("dev {n}")) {
                assert_eq!(other, format!("dev {n}"), "{d}");
            }
            for (k, who) in [(image_lock(n), "image"), (pool_lock(n), "pool"), (rollout_lock(n), "rollout")] {
                if let Some(other) = locks.insert(k.clone(), format!("{who} {n}")) {
                    assert_eq!(other, format!("{who} {n}"), "{k}");
                }
            }
            assert!(runs.insert(pool_run_dir(n).to_string(), n.clone()).is_none_or(|o| &o == n));
        }
        assert!(!locks.contains_key(STORE_LOCK));
        assert!(!runs.contains_key(DEV_RUN_DIR), "no pool name is the dev run directory");
        assert!(validate("pool", DEV_RUN_DIR).is_err());
    }

    #[test]
    fn old_collisions_are_gone() {
        // Pool `dev`'s first desktop and image `001`'s dev desktop used to be one domain.
        assert_ne!(desktop_domain("dev", 1), dev_domain("001"));
        assert_eq!(desktop_domain("dev", 1), legacy_dev_domain("001"));
        assert!(!is_desktop_of("dev", &dev_domain("001")));
        assert_ne!(pool_run_dir("dev"), DEV_RUN_DIR);
    }

    #[test]
    fn derived_names_are_valid_domain_names_at_the_longest() {
        let long = "a".repeat(63);
        for d in [dev_domain(&long), desktop_domain(&"a".repeat(50), 999)] {
            crate::hypervisor::domain_xml::validate_name(&d).unwrap();
        }
    }
}
