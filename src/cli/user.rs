//! `vdim user add|list|remove` and `vdim pool entitle|unentitle`: thin-client users and
//! what they may use.

use super::global::{open, Global};
use super::output::print;
use crate::context::Context;
use crate::store::Actor;
use anyhow::Result;
use clap::Subcommand;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add a thin-client user and print their token once (only its hash is stored)
    Add {
        name: String,
        /// May use the admin API
        #[arg(long)]
        admin: bool,
        /// Token lifetime, e.g. 90d or 12h [default: no expiry]
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// All users, their pools and open sessions
    List,
    /// Remove a user: their open sessions are logged off first
    Remove { name: String },
}

pub fn run(g: &Global, cmd: UserCmd) -> Result<()> {
    let actor = Actor::resolve(None);
    let mut ctx = open(g)?;
    match cmd {
        UserCmd::Add { name, admin, expires } => {
            let u = ctx.users().add(&name, admin, expires, &actor)?;
            print(g.json, &u, |u| {
                format!(
                    "user '{}' added{}; their token (shown only now, keep it secret):\n{}",
                    u.user.name,
                    if u.user.admin { " as administrator" } else { "" },
                    u.token
                )
            })
        }
        UserCmd::List => {
            let l = ctx.users().list()?;
            print(g.json, &l, |l| {
                if l.is_empty() {
                    return "no users yet: 'vdim user add NAME'".into();
                }
                let mut s = format!("{:<24} {:<6} {:>8} {:<21} pools\n", "user", "admin", "sessions", "token expires");
                for u in l {
                    s += &format!(
                        "{:<24} {:<6} {:>8} {:<21} {}\n",
                        u.user.name,
                        if u.user.admin { "yes" } else { "" },
                        u.open_sessions,
                        u.user.token_expires.as_deref().unwrap_or("never"),
                        u.pools.join(",")
                    );
                }
                s.trim_end().to_string()
            })
        }
        UserCmd::Remove { name } => {
            let r = ctx.sessions()?.remove_user(&name, &actor, &|_| {})?;
            print(g.json, &r, |r| {
                let mut s = format!("user '{}' removed ({} open sessions logged off)", r.user, r.sessions_closed.len());
                for d in &r.kept_desktops {
                    s += &format!(
                        "\n  {d} stays assigned to '{}' with its disk: 'vdim pool release {d}' gives it back",
                        r.user
                    );
                }
                s
            })
        }
    }
}

/// `vdim pool entitle|unentitle POOL USER`.
pub fn entitle(g: &Global, ctx: &mut Context, pool: &str, user: &str, grant: bool) -> Result<()> {
    let actor = Actor::resolve(None);
    let e = if grant {
        ctx.users().entitle(pool, user, &actor)?
    } else {
        ctx.sessions()?.unentitle(pool, user, &actor, &|_| {})?
    };
    print(g.json, &e, |e| match (grant, e.changed) {
        (true, true) => format!("user '{}' may now open sessions in pool '{}'", e.user, e.pool),
        (true, false) => format!("user '{}' was already entitled to pool '{}'", e.user, e.pool),
        (false, true) => format!(
            "user '{}' may no longer open sessions in pool '{}' ({} open session logged off)",
            e.user,
            e.pool,
            e.sessions_closed.len()
        ),
        (false, false) => format!("user '{}' was not entitled to pool '{}'", e.user, e.pool),
    })
}
