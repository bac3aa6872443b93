//! `vdim incident list|show|ack`: incidents the fleet watch opened, and their review.

use super::global::{open, Global};
use super::output::print;
use crate::incident;
use crate::store::Actor;
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum IncidentCmd {
    /// Incidents, newest first
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// The review: timeline, blast radius, times to detect and restore
    Show {
        id: i64,
        /// A post-incident review to paste into a tracker
        #[arg(long)]
        markdown: bool,
    },
    /// Acknowledge an incident with a note (what was found, what was done)
    Ack {
        id: i64,
        #[arg(long)]
        note: String,
    },
}

fn line(i: &crate::catalog::incidents::Incident) -> String {
    format!(
        "{:>4}  {:<12} {}  '{}' v{} in {}  {}: {}",
        i.id,
        i.state,
        incident::at(i.opened_ms),
        i.image,
        i.version,
        i.channel,
        i.action.as_str(),
        i.report.decision
    )
}

pub fn run(g: &Global, cmd: IncidentCmd) -> Result<()> {
    let mut ctx = open(g)?;
    match cmd {
        IncidentCmd::List { limit } => {
            let all = incident::list(ctx.catalog(), limit)?;
            print(g.json, &all, |all| {
                if all.is_empty() {
                    return "no incidents".into();
                }
                all.iter().map(line).collect::<Vec<_>>().join("\n")
            })
        }
        IncidentCmd::Show { id, markdown } => {
            if markdown && g.json {
                return Err(incident::IncidentError::TwoFormats.into());
            }
            let r = incident::review(ctx.catalog(), id)?;
            if markdown {
                print!("{}", incident::markdown(&r));
                return Ok(());
            }
            print(g.json, &r, incident::text)
        }
        IncidentCmd::Ack { id, note } => {
            let i = incident::ack(ctx.catalog(), id, &note, &Actor::resolve(None))?;
            print(g.json, &i, line)
        }
    }
}
