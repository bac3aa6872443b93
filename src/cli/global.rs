//! What every command shares: the global flags and opening the vdim home with them.

use crate::home::Home;
use crate::hypervisor::{Hypervisor, Libvirt};
use crate::store::Store;
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
}

pub fn home(g: &Global) -> Home {
    Home::new(g.home.clone().unwrap_or_else(Home::default_root))
}

pub fn open_store(g: &Global) -> Result<Store> {
    let mut store = Store::open(home(g))?;
    // A rollout whose vdim was killed is found by the next command, whatever it is.
    for line in crate::rollout::recover_interrupted(&mut store)? {
        eprintln!("warning: {line}");
    }
    Ok(store)
}

pub fn connect(g: &Global) -> Result<Box<dyn Hypervisor>> {
    Ok(Box::new(Libvirt::connect(&g.connect)?))
}

pub fn profiles_dir(g: &Global) -> PathBuf {
    g.profiles.clone().unwrap_or_else(|| home(g).root().join("profiles"))
}
