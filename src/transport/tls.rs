//! rustls configuration: server certificates from files or a generated development CA,
//! and client trust (the system store plus extra CA files).
//!
//! One crypto provider (aws-lc-rs, rustls' default: on the x86-64 measured its X25519 takes
//! half of *ring*'s time and its AES-GCM 0.6×; benches/RESULTS.md), TLS 1.2 and 1.3 only.
//! Client configs are shared per process, so rustls' session cache gives resumption to
//! repeated connections to the same relay.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The crypto provider of every TLS connection the process makes or accepts (also the
/// Redis client's, which takes the process default).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    // Our clients (hcm, bridge, hyrelay's own tools) ask for AES-128-GCM first: its key
    // schedule hashes with SHA-256, which this hardware computes (SHA-NI), where the SHA-384
    // of AES-256 has no hardware path, and AES-128 runs 10 rounds instead of 14.
    // Measured: 0.87-0.94x the CPU per new TLS tunnel; TLS bulk unchanged within this
    // machine's noise (benches/RESULTS.md, "TLS handshakes"). A rustls server follows the
    // client's order, so Microsoft's clients still get the suite they ask for.
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        _ => 1,
    });
    Arc::new(p)
}

/// TLS 1.3 session tickets a server sends after each handshake. One is enough: a client
/// resuming spends one ticket and receives a fresh one, so its supply keeps up with the
/// connections it opens at once (rustls keeps up to 8 per server). rustls' default is 2,
/// which costs every handshake a ticket to encrypt, send and store that nobody uses.
const TLS13_TICKETS: usize = 1;

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
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key do not match or are unsupported")?;
    cfg.send_tls13_tickets = TLS13_TICKETS;
    // Our record layer (tls_conn.rs) takes the traffic keys from rustls after the handshake.
    cfg.enable_secret_extraction = true;
    // Stateless tickets (encrypted with a key rotated every 6 h): resumption works for any
    // number of clients. rustls' default keeps 256 sessions in memory, so a relay serving
    // more clients than that evicted tickets before they were used and fell back to full
    // handshakes (a certificate signature and its verification each).
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().context("making the TLS session ticket key")?;
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
    client_config_with(provider(), extra_ca)
}

/// [`client_config`] with the crypto provider (and so the suite order) `provider`.
pub(crate) fn client_config_with(
    provider: Arc<rustls::crypto::CryptoProvider>,
    extra_ca: &[PathBuf],
) -> anyhow::Result<Arc<ClientConfig>> {
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
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Our record layer (tls_conn.rs) takes the traffic keys from rustls after the handshake.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustls::client::{
        ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue,
    };
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, NamedGroup, ServerConnection};

    use super::*;

    /// Moves TLS records between a client and a server in memory until neither has more
    /// to send (a bounded number of rounds).
    fn exchange(client: &mut ClientConnection, server: &mut ServerConnection) {
        for _ in 0..20 {
            let mut moved = false;
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                moved = true;
                server.read_tls(&mut buf.as_slice()).unwrap();
                server.process_new_packets().unwrap();
            }
            buf.clear();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                moved = true;
                client.read_tls(&mut buf.as_slice()).unwrap();
                client.process_new_packets().unwrap();
            }
            if !moved {
                return;
            }
        }
        panic!("the handshake did not settle in 20 rounds");
    }

    /// Counts the TLS 1.3 tickets a client is given (and stores them as rustls would).
    #[derive(Debug)]
    struct CountingStore {
        inner: ClientSessionMemoryCache,
        tickets: AtomicUsize,
    }

    impl ClientSessionStore for CountingStore {
        fn set_kx_hint(&self, n: ServerName<'static>, g: NamedGroup) {
            self.inner.set_kx_hint(n, g)
        }
        fn kx_hint(&self, n: &ServerName<'_>) -> Option<NamedGroup> {
            self.inner.kx_hint(n)
        }
        fn set_tls12_session(&self, n: ServerName<'static>, v: Tls12ClientSessionValue) {
            self.inner.set_tls12_session(n, v)
        }
        fn tls12_session(&self, n: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
            self.inner.tls12_session(n)
        }
        fn remove_tls12_session(&self, n: &ServerName<'static>) {
            self.inner.remove_tls12_session(n)
        }
        fn insert_tls13_ticket(&self, n: ServerName<'static>, v: Tls13ClientSessionValue) {
            self.tickets.fetch_add(1, Ordering::SeqCst);
            self.inner.insert_tls13_ticket(n, v)
        }
        fn take_tls13_ticket(&self, n: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(n)
        }
    }

    static DIR: Mutex<Option<tempfile::TempDir>> = Mutex::new(None);

    /// Our server config (development certificate), our client config trusting it, and
    /// the CA file.
    fn pair() -> (Arc<ServerConfig>, ClientConfig, PathBuf) {
        let mut dir = DIR.lock().unwrap();
        let dir = dir.get_or_insert_with(|| tempfile::tempdir().unwrap());
        let (server, files) = self_signed(dir.path(), &[]).unwrap();
        let client = Arc::unwrap_or_clone(client_config(std::slice::from_ref(&files.ca)).unwrap());
        (server, client, files.ca)
    }

    fn handshake(server: &Arc<ServerConfig>, client: Arc<ClientConfig>) -> (ClientConnection, ServerConnection) {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = ClientConnection::new(client, name).unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        exchange(&mut c, &mut s);
        assert!(!c.is_handshaking() && !s.is_handshaking());
        (c, s)
    }

    /// AES-128-GCM (see [`provider`]) and X25519 alone, as with *ring*: the hybrid
    /// post-quantum group (X25519MLKEM768) is not what our clients lead with (a 1.2 KB key
    /// share and an ML-KEM operation per handshake). Fails if a dependency turns on
    /// rustls' `prefer-post-quantum`.
    #[test]
    fn our_client_and_server_agree_on_aes_128_gcm_and_x25519() {
        let (server, client, _) = pair();
        let (c, s) = handshake(&server, Arc::new(client));
        let suite = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
        let x25519 = rustls::NamedGroup::X25519;
        assert_eq!(c.negotiated_cipher_suite().map(|s| s.suite()), Some(suite));
        assert_eq!(s.negotiated_cipher_suite().map(|s| s.suite()), Some(suite));
        assert_eq!(c.negotiated_key_exchange_group().map(|g| g.name()), Some(x25519));
        assert_eq!(s.negotiated_key_exchange_group().map(|g| g.name()), Some(x25519));
    }

    /// A client that offers only the post-quantum hybrid still gets a handshake.
    #[test]
    fn the_server_accepts_a_client_that_offers_only_x25519mlkem768() {
        let (server, _, ca) = pair();
        let mut only_pq = rustls::crypto::aws_lc_rs::default_provider();
        only_pq.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768];
        let client = client_config_with(Arc::new(only_pq), &[ca]).unwrap();
        let (c, _) = handshake(&server, client);
        assert_eq!(
            c.negotiated_key_exchange_group().map(|g| g.name()),
            Some(rustls::NamedGroup::X25519MLKEM768)
        );
    }

    #[test]
    fn the_server_follows_a_client_that_prefers_aes_256() {
        // As Microsoft's Node clients do (OpenSSL's default order).
        let (server, _, ca) = pair();
        let client = client_config_with(Arc::new(rustls::crypto::aws_lc_rs::default_provider()), &[ca]).unwrap();
        let (c, _) = handshake(&server, client);
        assert_eq!(
            c.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
        );
    }

    #[test]
    fn resumption_does_not_run_out_with_many_clients() {
        // More clients than rustls' default server cache (256 sessions) holds: each one's
        // second handshake still resumes.
        let (server, client, _) = pair();
        let clients: Vec<Arc<ClientConfig>> = (0..300)
            .map(|_| {
                let mut c = client.clone();
                c.resumption = rustls::client::Resumption::in_memory_sessions(8);
                Arc::new(c)
            })
            .collect();
        for c in &clients {
            handshake(&server, c.clone());
        }
        let full = clients
            .iter()
            .filter(|c| handshake(&server, (*c).clone()).0.handshake_kind() != Some(rustls::HandshakeKind::Resumed))
            .count();
        assert_eq!(full, 0, "second handshakes that were not resumed");
    }

    #[test]
    fn a_handshake_hands_the_client_one_ticket_and_a_second_resumes_with_it() {
        let (server, mut client, _) = pair();
        let store = Arc::new(CountingStore {
            inner: ClientSessionMemoryCache::new(16),
            tickets: AtomicUsize::new(0),
        });
        client.resumption = rustls::client::Resumption::store(store.clone());
        let client = Arc::new(client);
        let (first, _) = handshake(&server, client.clone());
        assert_eq!(first.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(store.tickets.load(Ordering::SeqCst), TLS13_TICKETS);
        let (second, _) = handshake(&server, client);
        assert_eq!(second.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        assert_eq!(store.tickets.load(Ordering::SeqCst), 2 * TLS13_TICKETS);
    }
}
