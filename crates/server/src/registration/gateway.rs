//! SMS gateways: where registration codes go. `console` prints them, `file:PATH` appends `<number> <code>`
//! lines to a file (for demos and tests), `http:URL` posts JSON to a webhook that talks to a real SMS
//! provider. Codes are secrets: no gateway logs them through `tracing`.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use natter_proto::PhoneNumber;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a code could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The gateway specification is not understood.
    #[error("unknown SMS gateway {0:?}: use console, file:PATH or http:URL")]
    BadSpec(String),
    /// Writing or posting failed.
    #[error("SMS gateway failed: {0}")]
    Failed(String),
}

/// Sends a registration code to a phone number.
#[async_trait]
pub trait SmsGateway: Send + Sync + 'static {
    /// Delivers `code` to `phone`.
    async fn send_code(&self, phone: &PhoneNumber, code: &str) -> Result<(), GatewayError>;
}

/// Builds a gateway from its specification.
pub fn from_spec(spec: &str) -> Result<Box<dyn SmsGateway>, GatewayError> {
    if spec == "console" {
        return Ok(Box::new(ConsoleGateway));
    }
    if let Some(path) = spec.strip_prefix("file:") {
        if path.is_empty() {
            return Err(GatewayError::BadSpec(spec.into()));
        }
        return Ok(Box::new(FileGateway {
            path: PathBuf::from(path),
        }));
    }
    if let Some(rest) = spec.strip_prefix("http:") {
        // Both `http:http://host/path` and a plain `http://host/path` are accepted.
        let url = if rest.starts_with("//") {
            format!("http:{rest}")
        } else {
            rest.to_owned()
        };
        return HttpGateway::new(&url).map(|g| Box::new(g) as Box<dyn SmsGateway>);
    }
    Err(GatewayError::BadSpec(spec.into()))
}

/// Prints codes on natterd's standard output.
#[derive(Debug)]
pub struct ConsoleGateway;

#[async_trait]
impl SmsGateway for ConsoleGateway {
    async fn send_code(&self, phone: &PhoneNumber, code: &str) -> Result<(), GatewayError> {
        println!("SMS to {phone}: your Natter code is {code}");
        Ok(())
    }
}

/// Appends one line `<number> <code>` per code to a file.
#[derive(Debug)]
pub struct FileGateway {
    path: PathBuf,
}

#[async_trait]
impl SmsGateway for FileGateway {
    async fn send_code(&self, phone: &PhoneNumber, code: &str) -> Result<(), GatewayError> {
        let fail =
            |e: std::io::Error| GatewayError::Failed(format!("{}: {e}", self.path.display()));
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(fail)?;
        }
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(fail)?;
        f.write_all(format!("{phone} {code}\n").as_bytes())
            .await
            .map_err(fail)?;
        f.flush().await.map_err(fail)?;
        Ok(())
    }
}

/// Posts `{"to": "+1555…", "code": "123456", "text": "…"}` to a webhook over plain HTTP/1.1. Meant for an
/// SMS relay on the same host or network; a 2xx answer counts as sent.
#[derive(Debug)]
pub struct HttpGateway {
    host_port: String,
    host_header: String,
    path: String,
}

const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

impl HttpGateway {
    /// Parses `http://host[:port]/path`.
    pub fn new(url: &str) -> Result<Self, GatewayError> {
        let bad = || GatewayError::BadSpec(url.into());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        let host_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            host_port,
            host_header: authority.to_owned(),
            path: path.to_owned(),
        })
    }

    async fn post(&self, body: &[u8]) -> Result<(), GatewayError> {
        let fail = |e: std::io::Error| GatewayError::Failed(e.to_string());
        let mut stream = tokio::net::TcpStream::connect(&self.host_port)
            .await
            .map_err(fail)?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.path,
            self.host_header,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.map_err(fail)?;
        stream.write_all(body).await.map_err(fail)?;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 512];
        // Only the status line matters; read until it is complete.
        while !answer.contains(&b'\n') && answer.len() < 4096 {
            let n = stream.read(&mut chunk).await.map_err(fail)?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&answer);
        let status = line.split_whitespace().nth(1).unwrap_or("");
        if status.starts_with('2') && status.len() == 3 {
            Ok(())
        } else {
            Err(GatewayError::Failed(format!(
                "webhook answered {:?}",
                line.lines().next().unwrap_or("nothing")
            )))
        }
    }
}

#[async_trait]
impl SmsGateway for HttpGateway {
    async fn send_code(&self, phone: &PhoneNumber, code: &str) -> Result<(), GatewayError> {
        let body = serde_json::json!({
            "to": phone.as_str(),
            "code": code,
            "text": format!("Your Natter code is {code}"),
        });
        let body = serde_json::to_vec(&body).map_err(|e| GatewayError::Failed(e.to_string()))?;
        tokio::time::timeout(HTTP_TIMEOUT, self.post(&body))
            .await
            .map_err(|_| GatewayError::Failed("webhook timed out".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn specs_parse() {
        assert!(from_spec("console").is_ok());
        assert!(from_spec("file:/tmp/x").is_ok());
        assert!(from_spec("file:").is_err());
        assert!(from_spec("http:http://127.0.0.1:9/hook").is_ok());
        assert!(from_spec("http://127.0.0.1:9/hook").is_ok());
        assert!(from_spec("smtp:x").is_err());
        assert!(HttpGateway::new("https://x").is_err());
    }

    #[tokio::test]
    async fn file_gateway_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/sms.log");
        let g = from_spec(&format!("file:{}", path.display())).unwrap();
        let a = PhoneNumber::from_e164("+15550000001").unwrap();
        g.send_code(&a, "123456").await.unwrap();
        g.send_code(&a, "654321").await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "+15550000001 123456\n+15550000001 654321\n");
    }

    #[tokio::test]
    async fn http_gateway_posts_json_and_checks_status() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut bodies = Vec::new();
            for status in ["200 OK", "500 Oops"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !String::from_utf8_lossy(&got).contains("\"code\"") {
                    let n = s.read(&mut buf).await.unwrap();
                    got.extend_from_slice(&buf[..n]);
                }
                bodies.push(String::from_utf8_lossy(&got).into_owned());
                s.write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            bodies
        });
        let g = from_spec(&format!("http:http://{addr}/sms")).unwrap();
        let a = PhoneNumber::from_e164("+15550000001").unwrap();
        g.send_code(&a, "111222").await.unwrap();
        assert!(g.send_code(&a, "111222").await.is_err());
        let bodies = server.await.unwrap();
        assert!(bodies[0].starts_with("POST /sms HTTP/1.1"));
        assert!(bodies[0].contains("\"to\":\"+15550000001\""));
    }
}
