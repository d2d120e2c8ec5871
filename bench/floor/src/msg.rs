//! The one message of every scenario: 100 bytes, fixed size, no framing beyond that. Bytes
//! 0..8 are a sequence number, 8..16 the send time (`CLOCK_MONOTONIC` ns), 16..20 a magic
//! that catches a reader out of step, the rest filler. [`Framer`] cuts a byte stream back
//! into messages however the reads split it.

/// Size of every message, as issue 22 measures (a private message is about that size).
pub const MESSAGE_BYTES: usize = 100;

const MAGIC: [u8; 4] = *b"flr1";
const FILL: u8 = 0x5a;

pub type Message = [u8; MESSAGE_BYTES];

/// A message with sequence number `seq`, sent at `sent_ns`.
pub fn encode(seq: u64, sent_ns: u64) -> Message {
    let mut m = [FILL; MESSAGE_BYTES];
    write(&mut m, seq, sent_ns);
    m
}

/// Rewrites the header of `m` in place (the filler stays).
pub fn write(m: &mut [u8], seq: u64, sent_ns: u64) {
    m[0..8].copy_from_slice(&seq.to_le_bytes());
    m[8..16].copy_from_slice(&sent_ns.to_le_bytes());
    m[16..20].copy_from_slice(&MAGIC);
}

pub fn seq(m: &Message) -> u64 {
    u64::from_le_bytes(m[0..8].try_into().expect("8 bytes"))
}

pub fn sent_ns(m: &Message) -> u64 {
    u64::from_le_bytes(m[8..16].try_into().expect("8 bytes"))
}

pub fn is_valid(m: &Message) -> bool {
    m[16..20] == MAGIC
}

/// Reassembles messages from one connection's reads; keeps a partial one between reads.
pub struct Framer {
    carry: Message,
    len: usize,
}

impl Default for Framer {
    fn default() -> Self {
        Self {
            carry: [0; MESSAGE_BYTES],
            len: 0,
        }
    }
}

impl Framer {
    /// Calls `f` for every message completed by `data`, in order.
    pub fn feed(&mut self, mut data: &[u8], mut f: impl FnMut(&Message)) {
        if self.len > 0 {
            let take = (MESSAGE_BYTES - self.len).min(data.len());
            self.carry[self.len..self.len + take].copy_from_slice(&data[..take]);
            self.len += take;
            data = &data[take..];
            if self.len < MESSAGE_BYTES {
                return;
            }
            f(&self.carry);
            self.len = 0;
        }
        let mut chunks = data.chunks_exact(MESSAGE_BYTES);
        for chunk in &mut chunks {
            f(chunk.try_into().expect("exact chunk"));
        }
        let rest = chunks.remainder();
        self.carry[..rest.len()].copy_from_slice(rest);
        self.len = rest.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framer_reassembles_any_split() {
        let stream: Vec<u8> = (0..5).flat_map(|i| encode(i, 1000 + i)).collect();
        for cut in [1, 7, 99, 100, 101, 250, 499, 500] {
            let mut framer = Framer::default();
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                framer.feed(piece, |m| {
                    assert!(is_valid(m));
                    got.push((seq(m), sent_ns(m)));
                });
            }
            assert_eq!(
                got,
                (0..5).map(|i| (i, 1000 + i)).collect::<Vec<_>>(),
                "cut {cut}"
            );
        }
    }
}
