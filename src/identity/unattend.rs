//! The Windows answer file of one desktop: its computer name and, optionally, the domain join,
//! both in the specialize pass (the pass a sysprep-generalized image runs at first boot).

use super::{Credentials, DomainJoin};
use crate::hypervisor::xml::escape as esc;

/// Attributes every component of an amd64 answer file carries (as Windows SIM writes them).
const COMPONENT_ATTRS: &str = r#"processorArchitecture="amd64" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS" xmlns:wcm="http://schemas.microsoft.com/WMIConfig/2002/State" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance""#;

/// `unattend.xml`: every value passes through the crate's one XML escaper.
pub fn answer_file(computer_name: &str, join: Option<(&DomainJoin, &Credentials)>) -> String {
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n");
    x += "<unattend xmlns=\"urn:schemas-microsoft-com:unattend\">\n";
    x += "  <settings pass=\"specialize\">\n";
    x += &format!("    <component name=\"Microsoft-Windows-Shell-Setup\" {COMPONENT_ATTRS}>\n");
    x += &format!("      <ComputerName>{}</ComputerName>\n", esc(computer_name));
    x += "    </component>\n";
    if let Some((j, c)) = join {
        x += &format!("    <component name=\"Microsoft-Windows-UnattendedJoin\" {COMPONENT_ATTRS}>\n");
        x += "      <Identification>\n";
        x += "        <Credentials>\n";
        x += &format!("          <Domain>{}</Domain>\n", esc(c.domain.as_deref().unwrap_or(&j.domain)));
        x += &format!("          <Password>{}</Password>\n", esc(&c.password));
        x += &format!("          <Username>{}</Username>\n", esc(&c.username));
        x += "        </Credentials>\n";
        x += &format!("        <JoinDomain>{}</JoinDomain>\n", esc(&j.domain));
        if let Some(ou) = &j.ou {
            x += &format!("        <MachineObjectOU>{}</MachineObjectOU>\n", esc(ou));
        }
        x += "      </Identification>\n";
        x += "    </component>\n";
    }
    x += "  </settings>\n</unattend>\n";
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// xmllint's reading of the file: `--noout` must pass, then the values at `paths`.
    fn xmllint(xml: &str, paths: &[&str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("unattend.xml");
        std::fs::write(&f, xml).unwrap();
        let out = Command::new("xmllint").arg("--noout").arg(&f).output().expect("xmllint (libxml2-utils) runs");
        assert!(out.status.success(), "not well-formed: {}\n{xml}", String::from_utf8_lossy(&out.stderr));
        paths
            .iter()
            .map(|p| {
                let xpath = format!(
                    "string({})",
                    p.split('/')
                        .map(|s| if s.is_empty() { String::new() } else { format!("*[local-name()='{s}']") })
                        .collect::<Vec<_>>()
                        .join("/")
                );
                let out = Command::new("xmllint").args(["--xpath", &xpath]).arg(&f).output().unwrap();
                // xmllint ends the value with a newline of its own.
                let v = String::from_utf8_lossy(&out.stdout).into_owned();
                v.strip_suffix('\n').unwrap_or(&v).to_string()
            })
            .collect()
    }

    fn join(ou: Option<&str>) -> DomainJoin {
        DomainJoin { domain: "corp.example.com".into(), ou: ou.map(Into::into), credentials: "/root/join.cred".into() }
    }

    #[test]
    fn the_computer_name_alone_is_a_well_formed_specialize_pass() {
        let xml = answer_file("FIN-001", None);
        let v = xmllint(&xml, &["/unattend/settings/component/ComputerName"]);
        assert_eq!(v[0], "FIN-001");
        assert!(xml.contains("<settings pass=\"specialize\">"));
        assert!(xml.contains("name=\"Microsoft-Windows-Shell-Setup\""));
        assert!(!xml.contains("UnattendedJoin"));
    }

    #[test]
    fn a_domain_join_carries_every_value_escaped_and_exact() {
        let nasty = "p<&>\"'w]]>d\t";
        let c = Credentials { username: "svc<join>".into(), password: nasty.into(), domain: None };
        let ou = "OU=R&D <VDI>,DC=corp,DC=example,DC=com";
        let xml = answer_file("FIN-001", Some((&join(Some(ou)), &c)));
        let id = "/unattend/settings/component/Identification";
        let v = xmllint(
            &xml,
            &[
                &format!("{id}/Credentials/Password"),
                &format!("{id}/Credentials/Username"),
                &format!("{id}/Credentials/Domain"),
                &format!("{id}/JoinDomain"),
                &format!("{id}/MachineObjectOU"),
                "/unattend/settings/component/ComputerName",
            ],
        );
        assert_eq!(v, [nasty, "svc<join>", "corp.example.com", "corp.example.com", ou, "FIN-001"]);
        assert!(xml.contains("name=\"Microsoft-Windows-UnattendedJoin\""));
        assert!(!xml.contains(nasty), "raw value never in the file");
    }

    #[test]
    fn the_accounts_own_domain_wins_and_the_ou_is_optional() {
        let c = Credentials { username: "svc".into(), password: "pw".into(), domain: Some("CORP".into()) };
        let xml = answer_file("FIN-001", Some((&join(None), &c)));
        let v = xmllint(&xml, &["/unattend/settings/component/Identification/Credentials/Domain"]);
        assert_eq!(v[0], "CORP");
        assert!(!xml.contains("MachineObjectOU"));
    }
}
