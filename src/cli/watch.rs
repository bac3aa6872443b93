//! `vdim watch policy` and `vdim watch events`: the fleet watch's breaker policy per channel,
//! and what it recorded.

use super::global::{open, Global};
use super::output::print;
use crate::catalog::incidents::{Action, Policy};
use crate::catalog::Channel;
use crate::store::Actor;
use crate::watch::PolicyChange;
use anyhow::Result;
use clap::Subcommand;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum WatchCmd {
    /// Show the breaker's policy of every channel, or one; with flags, change it
    Policy {
        channel: Option<Channel>,
        /// Distinct desktops of one version that must crash within --within (2 or more)
        #[arg(long, requires = "channel")]
        crashes: Option<u32>,
        /// Within this time (e.g. 15m)
        #[arg(long, requires = "channel", value_parser = humantime::parse_duration)]
        within: Option<Duration>,
        /// Or this share (percent) of the version's desktops, when that is fewer
        #[arg(long, requires = "channel")]
        share: Option<u32>,
        /// rollback: halt the version's rollouts, roll the channel back, mark it failed;
        /// alert: open the incident only [default: rollback for prod, alert elsewhere]
        #[arg(long, requires = "channel", value_enum)]
        action: Option<Action>,
    },
    /// What the watch recorded: crashes, reboot loops, stops, silent agents
    Events {
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        version: Option<u32>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn policy_text(p: &Policy) -> String {
    let share = p.share.map(|s| format!(" or {s}% of its desktops")).unwrap_or_default();
    let default = if p.set { "" } else { " (default)" };
    format!(
        "{}: {} desktops{share} of one version crashing within {} → {}{default}",
        p.channel,
        p.crashes,
        humantime::format_duration(p.within),
        p.action.as_str()
    )
}

pub fn run(g: &Global, cmd: WatchCmd) -> Result<()> {
    let mut ctx = open(g)?;
    match cmd {
        WatchCmd::Policy { channel: None, .. } => {
            let all = ctx
                .catalog()
                .read(|tx| Channel::ALL.iter().map(|c| tx.watch_policy(*c)).collect::<Result<Vec<_>, _>>())?;
            print(g.json, &all, |all| all.iter().map(policy_text).collect::<Vec<_>>().join("\n"))
        }
        WatchCmd::Policy { channel: Some(channel), crashes, within, share, action } => {
            let change = PolicyChange { crashes, share, within, action };
            let p = if crashes.is_none() && within.is_none() && share.is_none() && action.is_none() {
                ctx.catalog().read(|tx| tx.watch_policy(channel))?
            } else {
                crate::watch::set_policy(ctx.catalog(), channel, &change, &Actor::resolve(None))?
            };
            print(g.json, &p, policy_text)
        }
        WatchCmd::Events { image, version, limit } => {
            let events = ctx.catalog().read(|tx| {
                // An image or version that does not exist is an error, not "no events".
                if let Some(name) = image.as_deref() {
                    let img = tx.image(name)?;
                    if let Some(v) = version {
                        tx.version(&img, v)?;
                    }
                }
                tx.watch_events(image.as_deref(), version, limit)
            })?;
            print(g.json, &events, |events| {
                if events.is_empty() {
                    return "no events".into();
                }
                events
                    .iter()
                    .map(|e| {
                        format!(
                            "{}  {:<12} {} (pool {}, '{}' v{}, host {}): {}",
                            crate::incident::at(e.at_ms),
                            e.kind,
                            e.desktop,
                            e.pool,
                            e.image,
                            e.version,
                            e.host,
                            e.detail
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
    }
}
