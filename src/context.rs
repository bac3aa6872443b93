//! The service context: one value holding what every service works on (the home, a catalog
//! connection, the hypervisor, the profiles directory and the settings), opened the same way
//! by the CLI and by `vdim serve`.
//!
//! ```text
//!  Settings ──► Context::open ──► catalog opened (schema migrated), home dirs made,
//!                    │             interrupted rollouts found and halted (recovered())
//!                    ├─► store()    image store            (home + catalog)
//!                    ├─► users()    users, entitlements    (catalog)
//!                    ├─► pools()    pools and desktops     (home + catalog + hypervisor + profiles)
//!                    ├─► sessions() thin-client sessions   (pools)
//!                    ├─► engine()   rollouts               (pools)
//!                    └─► dev()      the dev desktop        (store + hypervisor + profiles)
//! ```
//! Invariants that hold whatever the entry point live here, not in a command's glue:
//! recovery of interrupted rollouts runs in [`Context::open`] (while no broker leads: the
//! leader adopts them instead), and [`Context::heal`] (the leading broker, when elected)
//! finishes interrupted logoffs and pool moves.
//!
//! The hypervisor is connected on first use, so commands that need no libvirt (image
//! import, list, history, gc, users, audit, ...) work without a daemon.
//!
//! The broker opens one context at start (so recovery and healing run once, there) and
//! pools catalog connections inside it: its [`Connector`] makes more contexts on the same
//! home that share the settings and the one hypervisor connection. SQLite
//! connections are not shared between threads, so each blocking call takes one of them.

use crate::catalog::{Catalog, CatalogError, Location};
use crate::dev::Dev;
use crate::fleet::{Progress, Quiet};
use crate::home::{self, Home};
use crate::hosts::Hosts;
use crate::hypervisor::{Connections, Hypervisor, HypervisorError, Libvirt};
use crate::pool::Pools;
use crate::rollout::Engine;
use crate::store::{Actor, Store};
use crate::users::{Reaped, Sessions, UserError, Users};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ContextError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Heal(#[from] UserError),
    #[error(transparent)]
    Pool(#[from] crate::pool::PoolError),
    #[error(transparent)]
    Rollout(#[from] crate::rollout::RolloutError),
    #[error("cannot create directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("cannot read or write the catalog's URL in {path}: {source}")]
    CatalogUrl { path: String, source: std::io::Error },
    #[error("the home {home} already has its catalog {recorded} ({counts}): to move it, 'vdim backup DIR' and 'vdim --catalog NEW restore DIR' onto an empty home")]
    OtherCatalog { home: String, recorded: String, counts: crate::catalog::Counts },
}

impl crate::error::Kind for ContextError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            ContextError::Catalog(e) => e.kind(),
            ContextError::Hypervisor(e) => e.kind(),
            ContextError::Heal(e) => e.kind(),
            ContextError::Pool(e) => e.kind(),
            ContextError::Rollout(e) => e.kind(),
            // vdim's own home directories.
            ContextError::Dir { .. } | ContextError::CatalogUrl { .. } => crate::error::ErrorKind::Internal,
            ContextError::OtherCatalog { .. } => crate::error::ErrorKind::Conflict,
        }
    }
}

pub type Result<T> = std::result::Result<T, ContextError>;

/// Where vdim works and how it reaches libvirt: the global flags (`--home`, `--connect`,
/// `--virt-type`, `--profiles`, `--parallel`) or what `vdim serve` was started with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub home: Home,
    /// libvirt connection URI.
    pub connect: String,
    /// Virtualisation type for new desktops: auto, kvm or qemu.
    pub virt_type: String,
    /// Directory of hardware profiles.
    pub profiles: PathBuf,
    /// libvirt calls in flight to the host at once (operations on many desktops).
    pub parallel: usize,
    /// `--catalog`: where the catalog is, when not the home's own (see [`Settings::catalog`]).
    pub catalog: Option<Location>,
}

impl Settings {
    /// The defaults for a home: qemu:///system, auto, `<home>/profiles`.
    pub fn new(home: Home) -> Settings {
        let profiles = home.root().join("profiles");
        Settings {
            home,
            connect: "qemu:///system".into(),
            virt_type: "auto".into(),
            profiles,
            parallel: crate::hypervisor::DEFAULT_PARALLEL,
            catalog: None,
        }
    }

    /// Where the catalog is: `--catalog` when given, else the PostgreSQL URL `vdim init`
    /// recorded in the home, else the home's SQLite file.
    pub fn catalog(&self) -> Result<Location> {
        if let Some(l) = &self.catalog {
            return Ok(l.clone());
        }
        let file = self.home.catalog_url();
        match std::fs::read_to_string(&file) {
            Ok(url) => Ok(Location::parse(url.trim())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Location::Sqlite(self.home.catalog())),
            Err(source) => Err(ContextError::CatalogUrl { path: file.display().to_string(), source }),
        }
    }
}

/// What every connection of one context shares.
struct Shared {
    settings: Settings,
    hv: OnceLock<Arc<dyn Hypervisor>>,
    /// The registered hosts' hypervisors, by URI, connected on first use.
    links: OnceLock<Connections>,
}

pub struct Context {
    shared: Arc<Shared>,
    catalog: Catalog,
    recovered: Vec<String>,
    /// Where operations on many desktops report desktops done (a terminal's progress line).
    progress: Arc<dyn Progress + Send>,
}

impl Context {
    /// Creates the home layout and the catalog (safe to run again) and opens them.
    /// A home whose catalog holds objects keeps that catalog: `init --catalog` elsewhere is
    /// refused (moving a catalog is a backup and a restore), so nothing is left behind unseen.
    pub fn init(mut settings: Settings) -> Result<Context> {
        make_dirs(&settings.home)?;
        let location = settings.catalog()?;
        let recorded = Settings { catalog: None, ..settings.clone() }.catalog()?;
        if recorded != location {
            let held = match &recorded {
                Location::Sqlite(db) if !db.exists() => crate::catalog::Counts::default(),
                _ => Catalog::peek_counts(&recorded).unwrap_or_default(),
            };
            if held != crate::catalog::Counts::default() {
                return Err(ContextError::OtherCatalog {
                    home: settings.home.root().display().to_string(),
                    recorded: recorded.to_string(),
                    counts: held,
                });
            }
        }
        settings.catalog = Some(location.clone());
        let catalog = Catalog::connect(&location, true)?;
        if let Location::Postgres(url) = &location {
            remember_catalog_url(&settings.home, url)?;
        }
        Context::start(settings, catalog)
    }

    /// Opens an initialised home: the catalog, its directories, and recovery of rollouts
    /// whose vdim died (see [`Context::recovered`]).
    pub fn open(mut settings: Settings) -> Result<Context> {
        let location = settings.catalog()?;
        let catalog = Catalog::connect(&location, false)?;
        settings.catalog = Some(location);
        make_dirs(&settings.home)?;
        Context::start(settings, catalog)
    }

    /// Opens an initialised home for `vdim serve`: no recovery of rollouts here, since the
    /// leading broker adopts those whose driver is gone instead of halting them.
    pub fn open_serving(mut settings: Settings) -> Result<Context> {
        let location = settings.catalog()?;
        let catalog = Catalog::connect(&location, false)?;
        settings.catalog = Some(location);
        make_dirs(&settings.home)?;
        Ok(Context::with_catalog(settings, catalog))
    }

    fn start(settings: Settings, catalog: Catalog) -> Result<Context> {
        let mut ctx = Context::with_catalog(settings, catalog);
        // A rollout whose vdim was killed is found by the next vdim, whatever it runs.
        ctx.recovered = crate::rollout::recover_interrupted(&mut ctx.catalog)?;
        Ok(ctx)
    }

    fn with_catalog(settings: Settings, catalog: Catalog) -> Context {
        let shared = Arc::new(Shared { settings, hv: OnceLock::new(), links: OnceLock::new() });
        Context { shared, catalog, recovered: vec![], progress: Arc::new(Quiet) }
    }

    /// What opens more connections of this context, from any thread.
    pub fn connector(&self) -> Connector {
        Connector(self.shared.clone())
    }

    /// Uses `hv` instead of connecting to `settings.connect` (a test's own hypervisor).
    /// Has no effect once the hypervisor was used.
    pub fn with_hypervisor(self, hv: Arc<dyn Hypervisor>) -> Context {
        let _ = self.shared.hv.set(hv);
        self
    }

    /// Reaches registered hosts through `links` (a test's fakes) instead of libvirt.
    /// Has no effect once a host was reached.
    pub fn with_connections(self, links: Connections) -> Context {
        let _ = self.shared.links.set(links);
        self
    }

    /// The registered hosts' hypervisors.
    pub fn links(&self) -> &Connections {
        self.shared.links()
    }

    /// Reports desktops done in operations on many desktops to `progress`.
    pub fn with_progress(mut self, progress: Arc<dyn Progress + Send>) -> Context {
        self.progress = progress;
        self
    }

    /// One line per interrupted rollout that opening this context found and halted.
    pub fn recovered(&self) -> &[String] {
        &self.recovered
    }

    pub fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    pub fn home(&self) -> &Home {
        &self.shared.settings.home
    }

    pub fn catalog(&mut self) -> &mut Catalog {
        &mut self.catalog
    }

    /// The hypervisor, connected on first use.
    pub fn hypervisor(&self) -> Result<Arc<dyn Hypervisor>> {
        self.shared.hypervisor()
    }

    pub fn store(&mut self) -> Store<'_> {
        Store::new(&self.shared.settings.home, &mut self.catalog)
    }

    pub fn hosts(&mut self) -> Hosts<'_> {
        Hosts::new(&self.shared.settings.home, &mut self.catalog, self.shared.links())
    }

    pub fn users(&mut self) -> Users<'_> {
        Users::new(&mut self.catalog)
    }

    pub fn pools(&mut self) -> Result<Pools<'_>> {
        let hv = self.shared.hypervisor_ref()?;
        let s = &self.shared.settings;
        let pools = Pools::new(&s.home, &mut self.catalog, hv, self.shared.links(), &s.profiles)?;
        Ok(pools.with_progress(&*self.progress))
    }

    pub fn sessions(&mut self) -> Result<Sessions<'_>> {
        Ok(Sessions::new(self.pools()?))
    }

    pub fn engine(&mut self, actor: Actor) -> Result<Engine<'_>> {
        let hv = self.shared.hypervisor_ref()?;
        let s = &self.shared.settings;
        let engine = Engine::new(&s.home, &mut self.catalog, hv, self.shared.links(), &s.profiles, actor)?;
        Ok(engine.with_progress(&*self.progress))
    }

    pub fn dev(&mut self) -> Result<Dev<'_>> {
        let hv = self.shared.hypervisor_ref()?;
        let s = &self.shared.settings;
        Ok(Dev::new(&s.home, &mut self.catalog, hv, &s.profiles, &s.virt_type))
    }

    /// Finishes what a crash left half done: expired sessions ended, interrupted logoffs
    /// and pool moves carried out (the broker runs this at start; pool commands heal the
    /// pool they touch).
    pub fn heal(&mut self, actor: &Actor) -> Result<Reaped> {
        Ok(self.sessions()?.heal(actor)?)
    }
}

/// Opens more catalog connections on a context's home, sharing its settings and hypervisor
/// (recovery already ran when that context was opened): what the broker pools.
#[derive(Clone)]
pub struct Connector(Arc<Shared>);

impl Connector {
    pub fn open(&self) -> Result<Context> {
        let catalog = Catalog::connect(&self.0.settings.catalog()?, false)?;
        Ok(Context { shared: self.0.clone(), catalog, recovered: vec![], progress: Arc::new(Quiet) })
    }
}

impl Shared {
    fn links(&self) -> &Connections {
        self.links.get_or_init(|| Connections::libvirt(self.settings.parallel))
    }

    fn hypervisor_ref(&self) -> Result<&dyn Hypervisor> {
        if let Some(hv) = self.hv.get() {
            return Ok(hv.as_ref());
        }
        let hv: Arc<dyn Hypervisor> = Arc::new(Libvirt::connect_with(&self.settings.connect, self.settings.parallel)?);
        // Two threads may connect at once: the first one kept wins, the other is dropped.
        let _ = self.hv.set(hv);
        Ok(self.hv.get().expect("just set").as_ref())
    }

    fn hypervisor(&self) -> Result<Arc<dyn Hypervisor>> {
        self.hypervisor_ref()?;
        Ok(self.hv.get().expect("connected").clone())
    }
}

fn make_dirs(home: &Home) -> Result<()> {
    for d in home.dirs() {
        home::create_private_dir(&d).map_err(|source| ContextError::Dir { path: d.display().to_string(), source })?;
    }
    Ok(())
}

/// The PostgreSQL URL the home's commands use from now on (0600: it may hold a password).
pub fn remember_catalog_url(home: &Home, url: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = home.catalog_url();
    let err = |source| ContextError::CatalogUrl { path: path.display().to_string(), source };
    let tmp = path.with_extension("url.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(home::PRIVATE_FILE)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(format!("{url}\n").as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}
