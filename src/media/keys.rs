//! The key schedule of PROTOCOL.md §3: MLS exporter secret → per-sender base key → SFrame
//! key and salt for one KID.

use hkdf::Hkdf;
use sha2::Sha256;

/// MLS exporter label for call secrets.
pub const EXPORTER_LABEL: &str = "marmot-call-v1";
/// Bits of the KID that carry the low bits of the MLS epoch.
pub const EPOCH_BITS: u32 = 4;
/// RFC 9605 cipher suite AES_128_GCM_SHA256_128.
pub const CIPHER_SUITE_ID: u16 = 0x0004;
/// The smallest sender field the profile allows.
pub const MIN_SENDER_BITS: u32 = 4;

/// What a key protects; part of both the base-key info and the KID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MediaType {
    Audio = 0x00,
    Video = 0x01,
    Screen = 0x02,
}

impl MediaType {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Audio),
            1 => Some(Self::Video),
            2 => Some(Self::Screen),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("leaf index {leaf} does not fit in {bits} sender bits")]
    LeafTooLarge { leaf: u32, bits: u32 },
    #[error("sender bits {0} outside 4..=32")]
    BadSenderBits(u32),
}

/// `call_secret(epoch)`: the 32-byte MLS exporter output for one call in one epoch.
#[derive(Clone, PartialEq, Eq)]
pub struct CallSecret([u8; 32]);

impl std::fmt::Debug for CallSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallSecret(..)")
    }
}

impl CallSecret {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// `base_key(sender) = HKDF-Expand(PRK = call_secret, "sframe" || media_type || leaf BE, 16)`.
    pub fn base_key(&self, media: MediaType, leaf_index: u32) -> BaseKey {
        // The exporter output is already uniformly random, so it is used as the PRK directly.
        let hk = Hkdf::<Sha256>::from_prk(&self.0).expect("32-byte PRK is valid for SHA-256");
        let info = base_key_info(media, leaf_index);
        let mut out = [0u8; 16];
        hk.expand(&info, &mut out)
            .expect("16 bytes is a valid HKDF-SHA256 output length");
        BaseKey(out)
    }
}

/// The HKDF info string for a sender's base key.
pub fn base_key_info(media: MediaType, leaf_index: u32) -> [u8; 11] {
    let mut info = [0u8; 11];
    info[..6].copy_from_slice(b"sframe");
    info[6] = media as u8;
    info[7..].copy_from_slice(&leaf_index.to_be_bytes());
    info
}

/// One sender's SFrame base key for one media type and epoch.
#[derive(Clone, PartialEq, Eq)]
pub struct BaseKey(pub(crate) [u8; 16]);

impl std::fmt::Debug for BaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BaseKey(..)")
    }
}

impl BaseKey {
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

/// How the profile packs media type, sender leaf and epoch into an SFrame KID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KidLayout {
    sender_bits: u32,
}

/// The parts of a KID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KidParts {
    pub media: u8,
    pub leaf_index: u32,
    pub epoch_low: u8,
}

impl KidLayout {
    pub fn new(sender_bits: u32) -> Result<Self, KeyError> {
        if !(MIN_SENDER_BITS..=32).contains(&sender_bits) {
            return Err(KeyError::BadSenderBits(sender_bits));
        }
        Ok(Self { sender_bits })
    }

    /// The smallest layout (≥ 4 bits) that holds leaf indices up to `max_leaf`.
    pub fn for_max_leaf(max_leaf: u32) -> Self {
        let needed = 32 - max_leaf.leading_zeros();
        Self {
            sender_bits: needed.max(MIN_SENDER_BITS),
        }
    }

    pub fn sender_bits(&self) -> u32 {
        self.sender_bits
    }

    /// `KID = media << (S + E) | leaf << E | epoch mod 2^E`.
    pub fn kid(&self, media: MediaType, leaf_index: u32, epoch: u64) -> Result<u64, KeyError> {
        if self.sender_bits < 32 && u64::from(leaf_index) >> self.sender_bits != 0 {
            return Err(KeyError::LeafTooLarge {
                leaf: leaf_index,
                bits: self.sender_bits,
            });
        }
        Ok(((media as u64) << (self.sender_bits + EPOCH_BITS))
            | (u64::from(leaf_index) << EPOCH_BITS)
            | (epoch % (1 << EPOCH_BITS)))
    }

    pub fn split(&self, kid: u64) -> KidParts {
        let epoch_low = (kid & ((1 << EPOCH_BITS) - 1)) as u8;
        let leaf_index = ((kid >> EPOCH_BITS) & ((1u64 << self.sender_bits) - 1)) as u32;
        let media = kid >> (self.sender_bits + EPOCH_BITS);
        KidParts {
            media: u8::try_from(media).unwrap_or(u8::MAX),
            leaf_index,
            epoch_low,
        }
    }
}

/// RFC 9605 §4.4.2 key material for one KID, spelled out for vectors and diagnostics; the
/// frame cipher itself derives the same values inside the `sframe` crate.
pub struct SframeKeyMaterial {
    pub secret: [u8; 32],
    pub key: [u8; 16],
    pub salt: [u8; 12],
}

impl SframeKeyMaterial {
    pub fn derive(base_key: &BaseKey, kid: u64) -> Self {
        let (prk, hk) = Hkdf::<Sha256>::extract(Some(&[]), &base_key.0);
        let mut key = [0u8; 16];
        let mut salt = [0u8; 12];
        let label = |what: &[u8]| {
            [
                b"SFrame 1.0 Secret ".as_slice(),
                what,
                &kid.to_be_bytes(),
                &CIPHER_SUITE_ID.to_be_bytes(),
            ]
            .concat()
        };
        hk.expand(&label(b"key "), &mut key).expect("valid length");
        hk.expand(&label(b"salt "), &mut salt)
            .expect("valid length");
        Self {
            secret: prk.into(),
            key,
            salt,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kid_round_trips_through_split() {
        let layout = KidLayout::new(6).unwrap();
        let kid = layout.kid(MediaType::Video, 37, 21).unwrap();
        assert_eq!(
            layout.split(kid),
            KidParts {
                media: 1,
                leaf_index: 37,
                epoch_low: 5
            }
        );
    }

    #[test]
    fn leaf_that_does_not_fit_is_refused() {
        let layout = KidLayout::new(4).unwrap();
        assert_eq!(
            layout.kid(MediaType::Audio, 16, 0),
            Err(KeyError::LeafTooLarge { leaf: 16, bits: 4 })
        );
        assert!(layout.kid(MediaType::Audio, 15, 0).is_ok());
    }

    #[test]
    fn layout_grows_with_the_highest_leaf() {
        assert_eq!(KidLayout::for_max_leaf(0).sender_bits(), 4);
        assert_eq!(KidLayout::for_max_leaf(15).sender_bits(), 4);
        assert_eq!(KidLayout::for_max_leaf(16).sender_bits(), 5);
        assert_eq!(KidLayout::for_max_leaf(1000).sender_bits(), 10);
        assert!(KidLayout::new(3).is_err());
    }
}
