//! `vdim audit`: the append-only audit log.

use super::global::{open, Global};
use super::output::print;
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    pool: Option<String>,
    #[arg(long, default_value_t = crate::catalog::DEFAULT_AUDIT_LIMIT)]
    limit: usize,
}

pub fn run(g: &Global, a: AuditArgs) -> Result<()> {
    let AuditArgs { image, pool, limit } = a;
    let log = open(g)?.catalog().read(|tx| tx.audit_log(image.as_deref(), pool.as_deref(), limit))?;
    print(g.json, &log, |log| {
        log.iter()
            .map(|e| {
                let mut what = e.action.clone();
                if let Some(i) = &e.image {
                    what += &format!(" image={i}");
                }
                if let Some(p) = &e.pool {
                    what += &format!(" pool={p}");
                }
                if let Some(v) = e.version {
                    what += &format!(" version={v}");
                }
                format!("{}  {:<10} {what}  {}", e.at, e.actor, e.detail)
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}
