//! Socket helpers for the handshake phase, before the driver's readiness loop takes over.

use natter_proto::noise::{RecordReader, SecureChannel};
use natter_proto::wire::Frame;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::connection::ConnError;

/// Reads until one whole record is buffered.
pub(crate) async fn read_record(
    stream: &mut TcpStream,
    reader: &mut RecordReader,
) -> Result<bytes::BytesMut, ConnError> {
    loop {
        if let Some(rec) = reader.next_record() {
            return Ok(rec);
        }
        reader.buffer_mut().reserve(4096);
        if stream.read_buf(reader.buffer_mut()).await? == 0 {
            return Err(ConnError::Closed);
        }
    }
}

/// Reads until one whole frame is decrypted.
pub(crate) async fn read_frame(
    stream: &mut TcpStream,
    reader: &mut RecordReader,
    channel: &mut SecureChannel,
) -> Result<Frame, ConnError> {
    loop {
        if let Some(f) = channel.next_frame()? {
            return Ok(f);
        }
        let rec = read_record(stream, reader).await?;
        channel.open_record(&rec)?;
    }
}
