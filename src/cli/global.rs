//! What every command shares: the global flags and the service context opened with them.

use crate::catalog::Location;
use crate::context::{Context, Settings};
use crate::home::Home;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// vdim home: store, catalog, desktops [default: /var/lib/vdim as root, else $XDG_DATA_HOME/vdim]
    #[arg(long, env = "VDIM_HOME", global = true)]
    pub home: Option<PathBuf>,
    /// Print machine-readable JSON
    #[arg(long, global = true)]
    pub json: bool,
    /// libvirt connection URI
    #[arg(long = "connect", env = "VDIM_CONNECT", global = true, default_value = "qemu:///system")]
    pub connect: String,
    /// Virtualisation type for new desktops: auto (kvm where /dev/kvm exists), kvm or qemu (TCG)
    #[arg(long, env = "VDIM_VIRT_TYPE", global = true, default_value = "auto")]
    pub virt_type: String,
    /// Directory of hardware profiles [default: $VDIM_HOME/profiles]
    #[arg(long, env = "VDIM_PROFILES", global = true)]
    pub profiles: Option<PathBuf>,
    /// libvirt calls in flight to the host at once when acting on many desktops (keep it below
    /// the host libvirtd's max_workers, 20 by default)
    #[arg(long, env = "VDIM_PARALLEL", global = true, default_value_t = crate::hypervisor::DEFAULT_PARALLEL,
          value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..=256), usize::from))]
    pub parallel: usize,
    /// The catalog: a PostgreSQL URL (postgres://user@db1/vdim) shared by several brokers, or
    /// a SQLite file [default: the URL `vdim init --catalog` recorded in the home, else
    /// $VDIM_HOME/catalog.db]
    #[arg(long, env = "VDIM_CATALOG", global = true, value_parser = |s: &str| Ok::<_, String>(Location::parse(s)))]
    pub catalog: Option<Location>,
}

impl Global {
    /// The settings every service works with, from these flags.
    pub fn settings(&self) -> Settings {
        let home = Home::new(self.home.clone().unwrap_or_else(Home::default_root));
        let profiles = self.profiles.clone().unwrap_or_else(|| home.root().join("profiles"));
        Settings {
            home,
            connect: self.connect.clone(),
            virt_type: self.virt_type.clone(),
            profiles,
            parallel: self.parallel,
            catalog: self.catalog.clone(),
        }
    }
}

/// The context every command runs in; interrupted rollouts it found are warned about.
pub fn open(g: &Global) -> Result<Context> {
    let ctx = Context::open(g.settings())?.with_progress(super::output::TtyProgress::for_command(g.json));
    for line in ctx.recovered() {
        eprintln!("warning: {line}");
    }
    Ok(ctx)
}
