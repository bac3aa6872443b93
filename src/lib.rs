//! vdim: a virtual desktop image manager.
//!
//! Modules in the order data flows through them, as ARCHITECTURE.md draws it: a command
//! opens the context; an admin's file is inspected, converted and stored as versions; a
//! version is rolled out to pools of desktops; the broker gives those desktops to thin
//! clients. The ground every step stands on comes last.

/// Command line: one module per command group, parsing and printing only.
pub mod cli;
/// The service context: home, catalog, hypervisor, profiles and settings, opened once per entry point.
pub mod context;
/// Inspection of untrusted image files before qemu-img sees them.
pub mod imgfmt;
/// The bounded qemu-img seam.
pub mod qemu_img;
/// Native qcow2 header reading and the thin-overlay writer.
pub mod qcow2;
/// SHA-256 of layer files.
pub mod digest;
/// The image store: import, edit, seal, verify, gc, export.
pub mod store;
/// The catalog, on SQLite (one machine) or PostgreSQL (several brokers): images, versions,
/// channels, drafts, pools, rollouts, users, hosts, leases, incidents, audit log.
pub mod catalog;
/// Backup and restore: a consistent copy of the live catalog with its layers; a restore onto an
/// empty home, every layer verified before the catalog is put in place.
pub mod backup;
/// The dev desktop: an image's draft booted for patching, shut down before sealing.
pub mod dev;
/// libvirt hosts: registered by URI, the layers each holds verified.
pub mod hosts;
/// Layers reach a host, verified: a chain uploaded (sparse) into a host's layer store, read back.
pub mod replica;
/// Lifecycle rules as a pure state machine: which move, rollback or release is allowed.
pub mod rules;
/// The soak's health rules: a pure verdict over lifecycle events, agent replies and time.
pub mod health;
/// The rollout engine: canary waves watched by lifecycle events, undone on a crash.
pub mod rollout;
/// The fleet watch: every desktop's crashes recorded, a version that crashes too many stopped
/// by the circuit breaker (incident, rollback), a webhook told.
pub mod watch;
/// Incidents and their review: timeline, blast radius, times to detect and restore.
pub mod incident;
/// Pools of desktops: thin overlays, domains, update, rollback, assignment.
pub mod pool;
/// Per-desktop identity: hostname pattern, answer file, domain join, the config drive.
pub mod identity;
/// Hardware profiles (TOML): the virtual hardware an image boots on, validated at load.
pub mod profile;
/// The libvirt seam: one trait, the `virt` implementation, lifecycle events, the domain XML with
/// its one escaper, a recording fake for tests.
pub mod hypervisor;
/// Acting on many desktops at once: bounded concurrency per host, per-desktop outcomes, progress.
pub mod fleet;
/// Thin-client users, entitlements and sessions (tokens, console tickets, logoff).
pub mod users;
/// Who leads the brokers (a lease in the catalog) and whether a rollout's driver is gone.
pub mod leader;
/// A host leaves: drained, or dead and fenced; its desktops made again on other hosts.
pub mod failover;
/// The thin-client broker (`vdim serve`): HTTP API, `.vv` files, HTML5 console proxy, TLS.
pub mod broker;
/// One error kind for every module error: exit codes, HTTP statuses, `--json` errors.
pub mod error;
/// Layout of the vdim home directory.
pub mod home;
/// The one naming rule for images, pools and users, and every name derived from them.
pub mod names;
/// Per-image and store-wide locks between concurrent commands.
pub mod lock;
/// Pause points between a command's read and its write, for tests of concurrent commands.
pub mod test_hook;
