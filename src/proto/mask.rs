//! WebSocket payload masking (RFC 6455 §5.3).
//!
//! Masking is an XOR with a 4-byte key that repeats over the payload. Payloads arrive in
//! chunks, so every function takes the byte `offset` of the chunk inside its frame and
//! rotates the key accordingly. The hot loop works a machine word at a time; the compiler
//! vectorises it on every target, which runtime-notes.md measured at 24–70 GB/s.

/// XORs `buf` in place with `key`, as if `buf` started `offset` bytes into the payload.
///
/// Masking and unmasking are the same operation.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = rotate(key, offset);
    // Head: bytes up to the next 8-byte boundary of the slice, one at a time.
    let head = buf.as_ptr().align_offset(8).min(buf.len());
    let (head_bytes, rest) = buf.split_at_mut(head);
    for (i, b) in head_bytes.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
    let key = rotate(key, head);
    let word = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut chunks = rest.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let v = u64::from_ne_bytes(bytes) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// The key as seen from `offset` bytes into the payload.
fn rotate(key: [u8; 4], offset: usize) -> [u8; 4] {
    let r = offset & 3;
    [key[r], key[(r + 1) & 3], key[(r + 2) & 3], key[(r + 3) & 3]]
}

/// The straightforward byte loop; the reference the fast path is tested against.
pub fn apply_mask_bytewise(buf: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= key[(offset + i) & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_bytewise_for_all_offsets_and_alignments() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..9 {
            for len in [0, 1, 3, 7, 8, 9, 15, 16, 17, 64, 100, 250] {
                for offset in 0..5 {
                    let mut a = data[start..start + len].to_vec();
                    let mut b = a.clone();
                    apply_mask(&mut a, key, offset);
                    apply_mask_bytewise(&mut b, key, offset);
                    assert_eq!(a, b, "start {start} len {len} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn chunked_masking_equals_whole() {
        let key = [1, 2, 3, 4];
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, key, 0);
        let mut chunked = data.clone();
        let mut off = 0;
        for size in [1, 5, 13, 64, 917] {
            apply_mask(&mut chunked[off..off + size], key, off);
            off += size;
        }
        assert_eq!(whole, chunked);
        apply_mask(&mut chunked, key, 0);
        assert_eq!(chunked, data, "masking twice restores the payload");
    }
}
