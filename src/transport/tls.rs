//! rustls configuration: server certificates from files or a generated development CA,
//! and client trust (the system store plus extra CA files).
//!
//! One crypto provider (ring), TLS 1.2 and 1.3 only. Client configs are shared per process,
//! so rustls' session cache gives resumption to repeated connections to the same relay.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (a chain, leaf first); an error if it holds none.
pub fn read_certs(cert: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing TLS certificate {}", cert.display()))?;
    if certs.is_empty() {
        bail!("TLS certificate file {} holds no certificate", cert.display());
    }
    Ok(certs)
}

/// Server config from a PEM certificate chain and a PEM private key.
pub fn server_config_from_files(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    // A key (or certificate) handed over by systemd: `${CREDENTIALS_DIRECTORY}/relay.key`.
    let (cert, key) = (
        &crate::config::secrets::expand_path(cert)?,
        &crate::config::secrets::expand_path(key)?,
    );
    let certs = read_certs(cert)?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading TLS private key {}", key.display()))?;
    server_config(certs, key)
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key do not match or are unsupported")?;
    Ok(Arc::new(cfg))
}

/// Files of a generated development CA and server certificate.
#[derive(Debug, Clone)]
pub struct DevCertFiles {
    /// The CA certificate clients must trust (`--ca-file`).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl DevCertFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }
}

/// Loads the development certificate in `dir`, or generates a CA and a server certificate
/// for `names` (plus localhost, 127.0.0.1 and ::1) if there is none yet or it lacks a name.
pub fn self_signed(dir: &Path, names: &[String]) -> anyhow::Result<(Arc<ServerConfig>, DevCertFiles)> {
    let files = DevCertFiles::in_dir(dir);
    let mut all: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for n in names {
        if !all.iter().any(|a| a.eq_ignore_ascii_case(n)) {
            all.push(n.clone());
        }
    }
    let names_file = dir.join("names.txt");
    let have = std::fs::read_to_string(&names_file).unwrap_or_default();
    let fresh = all.iter().all(|n| have.lines().any(|l| l == n)) && files.key.exists() && files.cert.exists();
    if !fresh {
        generate(&files, &all).context("generating the development TLS certificate")?;
        std::fs::write(&names_file, all.join("\n"))?;
    }
    Ok((server_config_from_files(&files.cert, &files.key)?, files))
}

fn generate(files: &DevCertFiles, names: &[String]) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let year = 1970 + (crate::proto::sas::unix_now() / 31_556_952) as i32;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "hyrelay development CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    ca.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name.push(DnType::CommonName, names[0].clone());
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    if let Some(dir) = files.key.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::config::write_private(&files.key, leaf_key.serialize_pem().as_bytes())?;
    std::fs::write(&files.cert, format!("{}{}", leaf_cert.pem(), ca_cert.pem()))?;
    std::fs::write(&files.ca, ca_cert.pem())?;
    Ok(())
}

/// Client config trusting the system store and every certificate in `extra_ca` files.
pub fn client_config(extra_ca: &[PathBuf]) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    for path in extra_ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading CA file {}", path.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing CA file {}", path.display()))?;
        if certs.is_empty() {
            bail!("CA file {} holds no certificate", path.display());
        }
        for c in certs {
            roots.add(c).with_context(|| format!("CA file {}", path.display()))?;
        }
    }
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
