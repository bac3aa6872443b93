//! vdim: a virtual desktop image manager.
//!
//! Data flows top to bottom; see ARCHITECTURE.md for the whole path from an imported image
//! to a thin client's screen.

/// The thin-client broker (`vdim serve`): HTTP API, `.vv` files, HTML5 console proxy, TLS.
pub mod broker;
/// The embedded SQLite catalog: images, versions, channels, drafts, audit log.
pub mod catalog;
/// Command line: argument parsing and printing, nothing else.
pub mod cli;
/// The broker's commands: `vdim user`, `vdim pool entitle`, `vdim serve`.
pub mod cli_broker;
/// The dev desktop: an image's draft booted for patching, shut down before sealing.
pub mod dev;
/// SHA-256 of layer files.
pub mod digest;
/// One error kind for every module error: exit codes, HTTP statuses, `--json` errors.
pub mod error;
/// The soak's health rules: a pure verdict over lifecycle events, agent replies and time.
pub mod health;
/// Layout of the vdim home directory.
pub mod home;
/// The libvirt seam: one trait, the `virt` implementation, lifecycle events, the domain XML, and
/// (`fake`) a recording in-memory implementation for tests without libvirtd.
pub mod hypervisor;
/// Inspection of untrusted image files before qemu-img sees them.
pub mod imgfmt;
/// Per-image and store-wide locks between concurrent commands.
pub mod lock;
/// The one naming rule for images, pools and users, and every name derived from them.
pub mod names;
/// Pools of desktops: thin overlays, domains, update, rollback, assignment.
pub mod pool;
/// Hardware profiles (TOML): the virtual hardware an image boots on, validated at load.
pub mod profile;
/// Native qcow2 header reading and the thin-overlay writer.
pub mod qcow2;
/// The bounded qemu-img seam.
pub mod qemu_img;
/// The rollout engine: canary waves watched by lifecycle events, undone on a crash.
pub mod rollout;
/// Lifecycle rules as a pure state machine: which move, rollback or release is allowed.
pub mod rules;
/// The image store: import, edit, seal, verify, gc, export.
pub mod store;
/// Pause points between a command's read and its write, for tests of concurrent commands.
pub mod test_hook;
/// Thin-client users, entitlements and sessions (tokens, console tickets, logoff).
pub mod users;
