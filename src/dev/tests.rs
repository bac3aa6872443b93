//! The dev desktop against the recording fake hypervisor (no root, no libvirtd), on the
//! pool tests' fixture: image `img` with v1 and v2, whose layers are catalog rows only.

use super::*;
use crate::hypervisor::fake::Op;
use crate::pool::tests::{actor, changes, disks, Fixture};

const IMAGE: &str = "img";

fn edit_and_start(f: &mut Fixture) -> EditReport {
    f.ctx.dev().expect("dev").edit_and_start(IMAGE, None, &actor(), "test-linux").expect("edit --start")
}

#[test]
fn edit_start_defines_the_draft_as_the_dev_desktop_and_boots_it() {
    let mut f = Fixture::new();
    let report = edit_and_start(&mut f);
    let domain = names::dev_domain(IMAGE);
    assert!(report.draft.new);
    assert_eq!(report.draft.base_version, 2, "the newest version");
    let dev = report.dev_desktop.expect("a dev desktop");
    assert_eq!(dev.domain, domain);
    assert_eq!(
        changes(&f.hv.calls()),
        [(Op::Define, domain.clone(), None), (Op::Start, domain.clone(), Some("v2"))],
        "defined once and booted on the draft over v2"
    );
    let xml = f.hv.xml(&domain).expect("xml");
    assert_eq!(disks(&xml), vec![report.draft.draft.clone()], "the dev desktop writes to the draft");
    assert_eq!(f.hv.state(&domain).expect("state").0, DomainState::Running);
    let kinds: Vec<GraphicsKind> = dev.consoles.iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [GraphicsKind::Spice, GraphicsKind::Vnc]);
    for c in &dev.consoles {
        assert_eq!(f.hv.password(&domain, c.kind).as_deref(), Some(c.password.as_str()), "{:?}", c.kind);
    }

    // Again while it runs: the same draft and domain, neither defined nor started again.
    f.hv.take_calls();
    let again = edit_and_start(&mut f);
    assert!(!again.draft.new);
    assert_eq!(again.draft.draft, report.draft.draft);
    assert!(changes(&f.hv.calls()).is_empty(), "{:?}", f.hv.calls());
}

#[test]
fn seal_refuses_while_the_dev_desktop_runs_and_changes_nothing() {
    let mut f = Fixture::new();
    let report = edit_and_start(&mut f);
    let domain = names::dev_domain(IMAGE);
    f.hv.take_calls();
    let err = f.ctx.dev().expect("dev").seal(IMAGE, "patched", &actor(), None).expect_err("the draft is in use");
    assert!(matches!(&err, DevError::Running { image, domain: d } if image == IMAGE && *d == domain), "{err:?}");
    assert!(err.to_string().contains(&domain), "{err}");
    assert!(changes(&f.hv.calls()).is_empty(), "the dev desktop was left alone: {:?}", f.hv.calls());
    assert_eq!(f.hv.state(&domain).expect("state").0, DomainState::Running);
    assert!(report.draft.draft.is_file(), "the draft stays");
    let (versions, draft) = f
        .ctx
        .catalog()
        .read(|tx| -> std::result::Result<_, crate::catalog::CatalogError> {
            let image = tx.image(IMAGE)?;
            Ok((tx.versions(&image)?.len(), tx.draft(&image)?))
        })
        .expect("catalog");
    assert_eq!(versions, 2, "no version sealed");
    assert_eq!(draft.map(|d| d.base_version), Some(2));
}

#[test]
fn discard_removes_the_draft_and_its_dev_desktop() {
    let mut f = Fixture::new();
    let report = edit_and_start(&mut f);
    let domain = names::dev_domain(IMAGE);
    f.hv.take_calls();
    f.ctx.dev().expect("dev").discard(IMAGE, &actor()).expect("discard");
    assert_eq!(changes(&f.hv.calls()), [(Op::Destroy, domain.clone(), None), (Op::Undefine, domain.clone(), None)]);
    assert!(!f.hv.exists(&domain).expect("exists"));
    assert!(!report.draft.draft.exists(), "the draft file is gone");
}
