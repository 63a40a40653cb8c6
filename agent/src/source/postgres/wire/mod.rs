//! The PostgreSQL wire protocol for a `replication=database` session: TLS negotiation,
//! password/MD5/SCRAM authentication, simple queries, `COPY ... TO STDOUT`, and
//! START_REPLICATION (see [`replication`]). Message framing and SCRAM come from
//! `postgres-protocol`; the rest is the small part of libpq a walsender client needs.

mod paced;
pub mod replication;
pub mod tls;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::conn::{ChannelBindingMode, SourceUrl, SslMode};

/// A transport failure.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Socket error or the server closed the connection.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// TLS negotiation or certificate failure.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server refused the session (authentication, unknown database, too many clients).
    #[error("{0}")]
    Startup(String),
    /// The server answered a query with an error.
    #[error("{0}")]
    Server(String),
    /// Something the protocol does not allow.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// A plain or TLS socket.
pub enum PgStream {
    /// No TLS.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A Unix-domain socket (host given as a directory, as libpq does).
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            PgStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            PgStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A backend message: the ones `postgres-protocol` knows, plus CopyBothResponse.
pub enum Backend {
    /// Parsed by `postgres-protocol`.
    Msg(Message),
    /// `W`: the server entered COPY BOTH mode (START_REPLICATION accepted).
    CopyBothResponse,
}

/// A text row of a simple query: one value per column, NULL as None.
pub type Row = Vec<Option<Bytes>>;

/// An authenticated connection, idle between queries.
pub struct Conn {
    stream: PgStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// With `channel_binding=require` a password is only sent through SCRAM-SHA-256-PLUS: a
/// server (or a man in the middle) asking for it in clear text or as MD5 is refused before
/// anything is sent.
fn refuse_unbound(mode: ChannelBindingMode) -> Result<(), WireError> {
    if mode == ChannelBindingMode::Require {
        return Err(WireError::Startup(
            "channel_binding=require, but the server asks for a password without SCRAM".into(),
        ));
    }
    Ok(())
}

/// "message (SQLSTATE code)" from an ErrorResponse, with its detail when there is one.
pub fn error_text(body: &ErrorResponseBody) -> String {
    let (mut msg, mut code, mut detail) = (String::new(), String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'M' => msg = v,
            b'C' => code = v,
            b'D' => detail = v,
            _ => {}
        }
    }
    let mut out = if code.is_empty() {
        msg
    } else {
        format!("{msg} (SQLSTATE {code})")
    };
    if !detail.is_empty() {
        out.push_str(": ");
        out.push_str(&detail);
    }
    out
}

fn io_err(what: &str) -> WireError {
    WireError::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("server closed the connection {what}"),
    ))
}

impl Conn {
    /// Connect, negotiate TLS per `sslmode`, authenticate and wait until the session is ready.
    /// `options` are the startup parameters besides user and database.
    pub async fn connect(url: &SourceUrl, options: &[(&str, &str)]) -> Result<Self, WireError> {
        let stream = if url.host.starts_with('/') {
            // A local socket needs no TLS (libpq does not negotiate it either).
            let path = format!("{}/.s.PGSQL.{}", url.host.trim_end_matches('/'), url.port);
            PgStream::Unix(tokio::net::UnixStream::connect(path).await?)
        } else {
            match Self::open_tcp(url, true).await {
                // libpq's prefer: when TLS cannot be set up, try again without it.
                Err(WireError::Tls(e)) if url.sslmode == SslMode::Prefer => {
                    tracing::debug!(error = %e, "TLS failed with sslmode=prefer; connecting without TLS");
                    Self::open_tcp(url, false).await?
                }
                other => other?,
            }
        };
        let mut conn = Self {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
        };
        let mut params = vec![
            ("user", url.user.as_str()),
            ("database", url.database.as_str()),
        ];
        params.extend_from_slice(options);
        frontend::startup_message(params.iter().copied(), &mut conn.wbuf)?;
        conn.send().await?;
        conn.authenticate(url).await?;
        let mut sql_ascii = false;
        loop {
            match conn.read().await? {
                Backend::Msg(Message::ReadyForQuery(_)) => break,
                Backend::Msg(Message::ParameterStatus(p))
                    if p.name().ok() == Some("server_encoding") =>
                {
                    sql_ascii = p.value().ok() == Some("SQL_ASCII");
                }
                Backend::Msg(Message::ErrorResponse(e)) => {
                    return Err(WireError::Startup(error_text(&e)))
                }
                _ => {}
            }
        }
        // A SQL_ASCII database may hold any bytes: converted to UTF-8 by the server, one
        // invalid byte fails the whole copy or stops the walsender at that change for good.
        // Taken as they are, a value that is not UTF-8 is one dead letter.
        if sql_ascii {
            conn.simple_query("SET client_encoding = 'SQL_ASCII'")
                .await?;
        }
        Ok(conn)
    }

    /// A TCP connection, with TLS negotiated per `sslmode` when `tls`.
    async fn open_tcp(url: &SourceUrl, tls: bool) -> Result<PgStream, WireError> {
        let tcp = TcpStream::connect((url.host.as_str(), url.port)).await?;
        let _ = tcp.set_nodelay(true);
        if tls {
            Self::negotiate_tls(tcp, url).await
        } else {
            Ok(PgStream::Plain(tcp))
        }
    }

    async fn negotiate_tls(mut tcp: TcpStream, url: &SourceUrl) -> Result<PgStream, WireError> {
        let Some(cfg) = tls::client_config(url.sslmode, url.sslrootcert.as_deref())? else {
            return Ok(PgStream::Plain(tcp));
        };
        let mut req = BytesMut::new();
        frontend::ssl_request(&mut req);
        tcp.write_all(&req).await?;
        let answer = tcp.read_u8().await?;
        match answer {
            b'S' => {
                let name = tls::server_name(&url.host)?;
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| WireError::Tls(e.to_string()))?;
                Ok(PgStream::Tls(Box::new(tls)))
            }
            b'N' if url.sslmode == SslMode::Prefer => Ok(PgStream::Plain(tcp)),
            b'N' => Err(WireError::Tls(format!(
                "the server does not accept TLS connections (sslmode={})",
                url.sslmode.as_str()
            ))),
            other => Err(WireError::Protocol(format!(
                "unexpected answer {other:#04x} to the TLS request"
            ))),
        }
    }

    async fn authenticate(&mut self, url: &SourceUrl) -> Result<(), WireError> {
        let need_password = |url: &SourceUrl| {
            if url.password.is_empty() {
                Err(WireError::Startup(
                    "the server asks for a password but the source URL has none".into(),
                ))
            } else {
                Ok(())
            }
        };
        let mut scram: Option<ScramSha256> = None;
        // The server's SCRAM signature was checked; SCRAM ran with channel binding.
        let (mut scram_verified, mut bound) = (false, false);
        // The server certificate's hash, for SCRAM channel binding over TLS.
        let (tls, end_point) = match &self.stream {
            PgStream::Tls(s) => (
                true,
                s.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| tls::end_point_hash(c)),
            ),
            _ => (false, None),
        };
        let cb_mode = url.channel_binding;
        if cb_mode == ChannelBindingMode::Require && !tls {
            return Err(WireError::Startup(
                "channel_binding=require needs a TLS connection (sslmode)".into(),
            ));
        }
        loop {
            match self.read().await? {
                Backend::Msg(Message::AuthenticationOk) => {
                    // A server that started SCRAM must prove it knows the password (the
                    // final message) before it may let us in.
                    if scram.is_some() && !scram_verified {
                        return Err(WireError::Startup(
                            "the server ended SCRAM authentication without proving its identity"
                                .into(),
                        ));
                    }
                    if cb_mode == ChannelBindingMode::Require && !bound {
                        // libpq's rule: without SCRAM-PLUS there was no binding to check.
                        return Err(WireError::Startup(
                            "channel_binding=require, but the server did not authenticate with SCRAM-SHA-256-PLUS".into(),
                        ));
                    }
                    return Ok(());
                }
                Backend::Msg(Message::AuthenticationCleartextPassword) => {
                    refuse_unbound(cb_mode)?;
                    need_password(url)?;
                    frontend::password_message(url.password.as_bytes(), &mut self.wbuf)?;
                }
                Backend::Msg(Message::AuthenticationMd5Password(body)) => {
                    refuse_unbound(cb_mode)?;
                    need_password(url)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        url.user.as_bytes(),
                        url.password.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                }
                Backend::Msg(Message::AuthenticationSasl(body)) => {
                    need_password(url)?;
                    let mut mechanisms = body.mechanisms();
                    let (mut plain, mut plus) = (false, false);
                    while let Some(m) = mechanisms.next()? {
                        plain |= m == "SCRAM-SHA-256";
                        plus |= m == "SCRAM-SHA-256-PLUS";
                    }
                    let (mechanism, binding) = match (&end_point, cb_mode) {
                        (Some(hash), ChannelBindingMode::Prefer | ChannelBindingMode::Require)
                            if plus =>
                        {
                            (
                                "SCRAM-SHA-256-PLUS",
                                ChannelBinding::tls_server_end_point(hash.clone()),
                            )
                        }
                        (_, ChannelBindingMode::Require) => {
                            return Err(WireError::Startup(
                                "channel_binding=require, but the server offers no SCRAM-SHA-256-PLUS \
                                 (or its certificate's signature algorithm has no binding)"
                                    .into(),
                            ))
                        }
                        // "y": we could bind but the server did not offer it (lets the server
                        // detect a downgrade); "n": no TLS or no usable certificate hash.
                        (Some(_), ChannelBindingMode::Prefer) if plain => {
                            ("SCRAM-SHA-256", ChannelBinding::unrequested())
                        }
                        _ if plain => ("SCRAM-SHA-256", ChannelBinding::unsupported()),
                        _ => {
                            return Err(WireError::Startup(
                                "the server offers no supported SASL mechanism (need SCRAM-SHA-256)"
                                    .into(),
                            ))
                        }
                    };
                    bound = mechanism == "SCRAM-SHA-256-PLUS";
                    let s = ScramSha256::new(url.password.as_bytes(), binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.wbuf)?;
                    scram = Some(s);
                }
                Backend::Msg(Message::AuthenticationSaslContinue(body)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| WireError::Protocol("SASL continue before start".into()))?;
                    s.update(body.data())
                        .map_err(|e| WireError::Startup(format!("SCRAM authentication: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                }
                Backend::Msg(Message::AuthenticationSaslFinal(body)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| WireError::Protocol("SASL final before start".into()))?;
                    s.finish(body.data())
                        .map_err(|e| WireError::Startup(format!("SCRAM authentication: {e}")))?;
                    scram_verified = true;
                    continue;
                }
                Backend::Msg(Message::ErrorResponse(e)) => {
                    return Err(WireError::Startup(error_text(&e)))
                }
                Backend::Msg(
                    Message::AuthenticationGss
                    | Message::AuthenticationSspi
                    | Message::AuthenticationKerberosV5
                    | Message::AuthenticationScmCredential
                    | Message::AuthenticationGssContinue(_),
                ) => {
                    return Err(WireError::Startup(
                        "the server asks for an authentication method other than password, md5 or scram-sha-256".into(),
                    ))
                }
                _ => {
                    return Err(WireError::Protocol(
                        "unexpected message during authentication".into(),
                    ))
                }
            }
            self.send().await?;
        }
    }

    /// Write what is queued in the write buffer.
    async fn send(&mut self) -> Result<(), WireError> {
        self.stream.write_all(&self.wbuf).await?;
        self.stream.flush().await?;
        self.wbuf.clear();
        Ok(())
    }

    /// The next backend message.
    pub async fn read(&mut self) -> Result<Backend, WireError> {
        loop {
            if let Some(m) = parse(&mut self.rbuf)? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    /// Read more from the socket into the read buffer.
    async fn fill(&mut self) -> Result<(), WireError> {
        // Large reads: a COPY streams many small messages back to back.
        if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
            self.rbuf.reserve(256 * 1024);
        }
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            return Err(io_err("while a reply was expected"));
        }
        Ok(())
    }

    /// Run one simple query; rows of its (last) result set in text form.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, WireError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.send().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read().await? {
                Backend::Msg(Message::DataRow(body)) => {
                    let buf = body.buffer_bytes().clone();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(r) = ranges.next()? {
                        row.push(r.map(|r| buf.slice(r)));
                    }
                    rows.push(row);
                }
                Backend::Msg(Message::RowDescription(_)) => rows.clear(),
                Backend::Msg(Message::ErrorResponse(e)) => error = Some(error_text(&e)),
                Backend::Msg(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(WireError::Server(e)),
                        None => Ok(rows),
                    }
                }
                Backend::Msg(Message::CopyOutResponse(_) | Message::CopyInResponse(_))
                | Backend::CopyBothResponse => {
                    return Err(WireError::Protocol(
                        "a simple query started a COPY; use copy_out".into(),
                    ))
                }
                _ => {}
            }
        }
    }

    /// Start `COPY ... TO STDOUT`; read the data with [`Conn::copy_out_next`].
    pub async fn copy_out_start(&mut self, sql: &str) -> Result<(), WireError> {
        self.start_copy(
            sql,
            |m| matches!(m, Backend::Msg(Message::CopyOutResponse(_))),
            "the statement is not a COPY TO STDOUT",
        )
        .await
    }

    /// Send `sql` (START_REPLICATION) and wait for CopyBothResponse.
    pub async fn start_copy_both(&mut self, sql: &str) -> Result<(), WireError> {
        self.start_copy(
            sql,
            |m| matches!(m, Backend::CopyBothResponse),
            "the server did not start streaming",
        )
        .await
    }

    /// Send `sql` and wait until the server enters the copy mode `started` recognises; an
    /// error (or a plain result, `not_copy`) ends the query first.
    async fn start_copy(
        &mut self,
        sql: &str,
        started: impl Fn(&Backend) -> bool,
        not_copy: &str,
    ) -> Result<(), WireError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.send().await?;
        let mut error = None;
        loop {
            match self.read().await? {
                m if started(&m) => return Ok(()),
                Backend::Msg(Message::ErrorResponse(e)) => error = Some(error_text(&e)),
                Backend::Msg(Message::ReadyForQuery(_)) => {
                    return Err(WireError::Server(error.unwrap_or_else(|| not_copy.into())))
                }
                _ => {}
            }
        }
    }

    /// Append the data of a started copy that has arrived (the payloads of the CopyData
    /// messages in the read buffer, waiting for at least one) to `out`, as many whole messages
    /// as fit in its spare capacity (an empty `out` grows to take one); false once the copy
    /// completed. Nothing appended while true means `out` is full. The COPY stream is the
    /// concatenation of the payloads, so no message object is made per row (the server sends
    /// one CopyData per row).
    pub async fn copy_out_into(&mut self, out: &mut BytesMut) -> Result<bool, WireError> {
        let mut error = None;
        loop {
            let mut got = false;
            while error.is_none() {
                let Some(len) = copy_data_len(&self.rbuf)? else {
                    break;
                };
                if out.capacity() - out.len() < len - 5 {
                    if !out.is_empty() {
                        return Ok(true);
                    }
                    out.reserve(len - 5);
                }
                out.extend_from_slice(&self.rbuf[5..len]);
                self.rbuf.advance(len);
                got = true;
            }
            if got {
                return Ok(true);
            }
            match parse(&mut self.rbuf)? {
                Some(Backend::Msg(Message::ErrorResponse(e))) => error = Some(error_text(&e)),
                Some(Backend::Msg(Message::ReadyForQuery(_))) => {
                    return match error {
                        Some(e) => Err(WireError::Server(e)),
                        None => Ok(false),
                    }
                }
                // CopyDone, CommandComplete, data after an error.
                Some(_) => {}
                None => self.fill().await?,
            }
        }
    }

    /// Split into the socket halves and what was read ahead (for the replication task).
    fn into_parts(self) -> (PgStream, BytesMut) {
        (self.stream, self.rbuf)
    }
}

/// The whole length of the CopyData message at the front of `buf`, if one is there complete.
fn copy_data_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    if buf.len() < 5 || buf[0] != b'd' {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(WireError::Protocol("bad CopyData length".into()));
    }
    Ok((buf.len() > len).then_some(1 + len))
}

/// The payload of the CopyData message at the front of `buf`, if one is there complete:
/// nearly every message of a replication stream, taken without a message object (one
/// reference count per message, not two).
pub(crate) fn split_copy_data(buf: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
    Ok(copy_data_len(buf)?.map(|len| {
        let mut m = buf.split_to(len).freeze();
        m.advance(5);
        m
    }))
}

/// One complete backend message from the front of `buf`, if there is one.
pub fn parse(buf: &mut BytesMut) -> Result<Option<Backend>, WireError> {
    if buf.len() >= 5 && buf[0] == b'W' {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len < 4 {
            return Err(WireError::Protocol("bad CopyBothResponse length".into()));
        }
        if buf.len() < 1 + len {
            buf.reserve(1 + len - buf.len());
            return Ok(None);
        }
        buf.advance(1 + len);
        return Ok(Some(Backend::CopyBothResponse));
    }
    Ok(Message::parse(buf)?.map(Backend::Msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![b'd'];
        m.extend((payload.len() as u32 + 4).to_be_bytes());
        m.extend(payload);
        m
    }

    #[test]
    fn copy_data_payloads_come_off_the_front_whole() {
        let mut wire = copy_data(b"first");
        wire.extend(copy_data(b""));
        wire.extend(copy_data(b"third"));
        let whole = wire.len();
        // The third message is cut short: it stays until the rest arrives.
        let mut buf = BytesMut::from(&wire[..whole - 2]);
        assert_eq!(split_copy_data(&mut buf).unwrap().unwrap(), &b"first"[..]);
        assert_eq!(split_copy_data(&mut buf).unwrap().unwrap(), &b""[..]);
        assert_eq!(split_copy_data(&mut buf).unwrap(), None);
        buf.extend_from_slice(&wire[whole - 2..]);
        assert_eq!(split_copy_data(&mut buf).unwrap().unwrap(), &b"third"[..]);
        assert!(buf.is_empty());
        // Another message is left for the general parser; a bad length is an error.
        let mut other = BytesMut::from(&b"c\0\0\0\x04"[..]);
        assert_eq!(split_copy_data(&mut other).unwrap(), None);
        assert_eq!(other.len(), 5);
        let mut bad = BytesMut::from(&b"d\0\0\0\x02xx"[..]);
        assert!(split_copy_data(&mut bad).is_err());
    }
}
