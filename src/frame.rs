//! gRPC's length-prefixed messages as an HTTP/2 body carries them: a
//! compression flag, a big-endian length, then the message. The
//! coordinator's front end reads requests and writes replies in this form,
//! and its HTTP/2 channel does the opposite.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// The compression flag and the length before every message.
pub const HEADER_BYTES: usize = 5;

/// `message` as one uncompressed frame.
pub fn encode<M: prost::Message>(message: &M) -> Bytes {
    let length = message.encoded_len();
    let mut frame = BytesMut::with_capacity(HEADER_BYTES + length);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    message.encode_raw(&mut frame);
    frame.freeze()
}

/// Why a body is not exactly one uncompressed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The compression flag is set (nothing here announces compression).
    #[error("the message is compressed")]
    Compressed,
    /// Fewer or more bytes than one frame holds.
    #[error("the body is not exactly one message")]
    NotOneMessage,
}

/// The DATA chunks of a body as they arrive. Most messages come in one
/// chunk, which is kept as it is; several are joined.
#[derive(Debug, Default)]
pub struct Gathered {
    single: Option<Bytes>,
    joined: BytesMut,
}

impl Gathered {
    /// Adds the next chunk.
    pub fn push(&mut self, chunk: Bytes) {
        match self.single.take() {
            None if self.joined.is_empty() => self.single = Some(chunk),
            None => self.joined.put(chunk),
            Some(first) => {
                self.joined.put(first);
                self.joined.put(chunk);
            }
        }
    }

    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.single.as_ref().map_or(self.joined.len(), Bytes::len)
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first frame's compression flag and declared length, once its
    /// header has arrived.
    pub fn header(&self) -> Option<(bool, usize)> {
        let bytes = self.single.as_deref().unwrap_or(&self.joined[..]);
        let header = bytes.get(..HEADER_BYTES)?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        Some((header[0] != 0, length as usize))
    }

    /// The message, if the body is exactly one uncompressed frame.
    pub fn into_message(self) -> Result<Bytes, FrameError> {
        match self.header() {
            Some((true, _)) => Err(FrameError::Compressed),
            Some((false, length)) if self.len() == HEADER_BYTES + length => {
                let mut frame = self.single.unwrap_or_else(|| self.joined.freeze());
                frame.advance(HEADER_BYTES);
                Ok(frame)
            }
            _ => Err(FrameError::NotOneMessage),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gathered(chunks: &[&[u8]]) -> Gathered {
        let mut gathered = Gathered::default();
        for chunk in chunks {
            gathered.push(Bytes::copy_from_slice(chunk));
        }
        gathered
    }

    #[test]
    fn one_frame_in_any_number_of_chunks_is_its_message() {
        let frame = encode(&crate::v1::SubmitRequest {
            token: Bytes::from_static(b"token"),
        });
        let message = frame.slice(HEADER_BYTES..);
        assert_eq!(gathered(&[&frame]).into_message(), Ok(message.clone()));
        let (a, b) = frame.split_at(3);
        let (b, c) = b.split_at(4);
        let split = gathered(&[a, b, c]);
        assert_eq!(split.header(), Some((false, message.len())));
        assert_eq!(split.into_message(), Ok(message));
    }

    #[test]
    fn anything_but_one_uncompressed_frame_is_refused() {
        let not_one = Err(FrameError::NotOneMessage);
        assert_eq!(gathered(&[]).into_message(), not_one);
        assert_eq!(gathered(&[&[0, 0]]).header(), None);
        assert_eq!(gathered(&[&[0, 0, 0, 0, 2, 7]]).into_message(), not_one);
        assert_eq!(gathered(&[&[0, 0, 0, 0, 1, 7, 7]]).into_message(), not_one);
        assert_eq!(
            gathered(&[&[1, 0, 0, 0, 1, 7]]).into_message(),
            Err(FrameError::Compressed)
        );
    }
}
