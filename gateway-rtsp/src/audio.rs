//! Audio for the RTSP client and the demo server: the two payload formats (L16, RFC 3551 4.5.11;
//! PCMU, G.711 mu-law, RFC 3551 4.5.14), 16-bit sample buffers, WAV files (through `hound`), a
//! generated tone, and the reassembly of received payloads by RTP timestamp.
//!
//! Pure except for [`Audio::read_wav`] and [`Audio::write_wav`], which touch only the file named.

use std::{
    f64::consts::PI,
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;

/// An audio payload format this crate sends and receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Codec {
    /// 16-bit linear PCM, big-endian, any rate and channel count (dynamic payload type).
    L16,
    /// G.711 mu-law, 8 kHz mono, payload type 0.
    Pcmu,
}

impl Codec {
    /// The encoding name of `a=rtpmap`.
    pub fn encoding_name(self) -> &'static str {
        match self {
            Self::L16 => "L16",
            Self::Pcmu => "PCMU",
        }
    }

    /// The codec of an `a=rtpmap` encoding name (case-insensitive).
    pub fn from_encoding_name(name: &str) -> Option<Self> {
        if name.eq_ignore_ascii_case("L16") {
            Some(Self::L16)
        } else if name.eq_ignore_ascii_case("PCMU") {
            Some(Self::Pcmu)
        } else {
            None
        }
    }

    /// The static payload types of RFC 3551 table 4 for these codecs: codec, clock rate, channels.
    pub fn from_static_payload_type(payload_type: u8) -> Option<(Self, u32, u16)> {
        match payload_type {
            0 => Some((Self::Pcmu, 8000, 1)),
            10 => Some((Self::L16, 44100, 2)),
            11 => Some((Self::L16, 44100, 1)),
            _ => None,
        }
    }

    /// Octets per sample in a payload.
    pub fn octets_per_sample(self) -> usize {
        match self {
            Self::L16 => 2,
            Self::Pcmu => 1,
        }
    }

    /// Appends the samples of `payload` to `out` (an odd trailing octet of L16 is ignored).
    pub fn decode(self, payload: &[u8], out: &mut Vec<i16>) {
        match self {
            Self::L16 => out.extend(
                payload
                    .chunks_exact(2)
                    .map(|pair| i16::from_be_bytes([pair[0], pair[1]])),
            ),
            Self::Pcmu => out.extend(payload.iter().map(|&octet| ulaw_decode(octet))),
        }
    }

    /// Appends the payload of `samples` to `out`.
    pub fn encode(self, samples: &[i16], out: &mut Vec<u8>) {
        match self {
            Self::L16 => out.extend(samples.iter().flat_map(|sample| sample.to_be_bytes())),
            Self::Pcmu => out.extend(samples.iter().map(|&sample| ulaw_encode(sample))),
        }
    }
}

/// G.711 mu-law to 16-bit linear.
pub fn ulaw_decode(octet: u8) -> i16 {
    let octet = !octet;
    let exponent = (octet >> 4) & 0x07;
    let mantissa = i16::from(octet & 0x0f);
    // At most ((15 << 3) + 0x84) << 7 = 32256: no overflow.
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    if octet & 0x80 == 0 {
        magnitude
    } else {
        -magnitude
    }
}

/// 16-bit linear to G.711 mu-law (bias 0x84, clipped at 32635).
pub fn ulaw_encode(sample: i16) -> u8 {
    const BIAS: u16 = 0x84;
    const CLIP: u16 = 32635;
    let sign = if sample < 0 { 0x80 } else { 0 };
    let magnitude = sample.unsigned_abs().min(CLIP) + BIAS;
    // The highest set bit is 7..=14; the exponent is its distance from 7.
    let highest = magnitude.ilog2();
    let exponent = u8::try_from(highest.saturating_sub(7)).unwrap_or(7);
    let mantissa = u8::try_from((magnitude >> (exponent + 3)) & 0x0f).unwrap_or(0);
    !(sign | (exponent << 4) | mantissa)
}

/// Reading or writing a WAV file failed.
#[derive(Debug, Error)]
pub enum AudioError {
    /// `hound` could not read or write the file.
    #[error("WAV file {path}: {error}")]
    Wav {
        /// The file.
        path: PathBuf,
        /// Why.
        error: hound::Error,
    },
    /// The file is valid but not usable here.
    #[error("WAV file {path}: {reason}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// 16-bit audio: interleaved samples, a rate and a channel count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audio {
    /// Frames per second.
    pub rate: u32,
    /// Channels per frame (1 or 2 in practice).
    pub channels: u16,
    /// Interleaved samples.
    pub samples: Vec<i16>,
}

impl Audio {
    /// A sine tone, mono, at half of full scale: deterministic, so a receiver can compare.
    pub fn tone(rate: u32, seconds: f64, frequency: f64) -> Self {
        let rate = rate.max(1);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a clamped, non-negative count of frames"
        )]
        let frames = (seconds.clamp(0.0, 3600.0) * f64::from(rate)).round() as usize;
        let samples = (0..frames)
            .map(|n| {
                #[expect(clippy::cast_precision_loss, reason = "frame index below 2^52")]
                let phase = 2.0 * PI * frequency * n as f64 / f64::from(rate);
                round_to_i16(16383.0 * phase.sin())
            })
            .collect();
        Self {
            rate,
            channels: 1,
            samples,
        }
    }

    /// Frames (samples per channel).
    pub fn frames(&self) -> usize {
        self.samples.len() / usize::from(self.channels.max(1))
    }

    /// Playing time.
    pub fn duration(&self) -> Duration {
        let frames = u64::try_from(self.frames()).unwrap_or(u64::MAX);
        Duration::from_micros(frames.saturating_mul(1_000_000) / u64::from(self.rate.max(1)))
    }

    /// What a PCMU receiver decodes from this audio: every sample through mu-law and back.
    #[must_use]
    pub fn through_pcmu(&self) -> Self {
        Self {
            samples: self
                .samples
                .iter()
                .map(|&sample| ulaw_decode(ulaw_encode(sample)))
                .collect(),
            ..*self
        }
    }

    /// Reads a PCM WAV file: 16-bit integer samples as they are; 8, 24 and 32-bit integer and
    /// 32-bit float samples converted to 16 bits.
    pub fn read_wav(path: &Path) -> Result<Self, AudioError> {
        let wav = |error| AudioError::Wav {
            path: path.to_owned(),
            error,
        };
        let mut reader = hound::WavReader::open(path).map_err(wav)?;
        let spec = reader.spec();
        let samples = match (spec.sample_format, spec.bits_per_sample) {
            (hound::SampleFormat::Int, 16) => reader
                .samples::<i16>()
                .collect::<Result<Vec<_>, _>>()
                .map_err(wav)?,
            (hound::SampleFormat::Int, bits @ (8 | 24 | 32)) => reader
                .samples::<i32>()
                .map(|sample| sample.map(|value| to_16_bits(value, bits)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(wav)?,
            (hound::SampleFormat::Float, 32) => reader
                .samples::<f32>()
                .map(|sample| sample.map(float_to_16_bits))
                .collect::<Result<Vec<_>, _>>()
                .map_err(wav)?,
            (format, bits) => {
                return Err(AudioError::Unsupported {
                    path: path.to_owned(),
                    reason: format!("{bits}-bit {format:?} samples"),
                });
            }
        };
        if spec.channels == 0 || spec.sample_rate == 0 {
            return Err(AudioError::Unsupported {
                path: path.to_owned(),
                reason: "no channels or a zero sample rate".to_owned(),
            });
        }
        Ok(Self {
            rate: spec.sample_rate,
            channels: spec.channels,
            samples,
        })
    }

    /// Writes a 16-bit PCM WAV file.
    pub fn write_wav(&self, path: &Path) -> Result<(), AudioError> {
        let wav = |error| AudioError::Wav {
            path: path.to_owned(),
            error,
        };
        let spec = hound::WavSpec {
            channels: self.channels.max(1),
            sample_rate: self.rate.max(1),
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut writer = hound::WavWriter::create(path, spec).map_err(wav)?;
        let mut samples = writer.get_i16_writer(u32::try_from(self.samples.len()).unwrap_or(0));
        for &sample in &self.samples {
            samples.write_sample(sample);
        }
        samples.flush().map_err(wav)?;
        writer.finalize().map_err(wav)
    }
}

/// How received audio compares with what was sent ([`Audio::compare`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Every sample equal, same length.
    Exact,
    /// The received audio is a sample-exact start of the sent audio (the receiver stopped early).
    Prefix {
        /// Frames received.
        frames: usize,
    },
    /// A sample differs (or the received audio is longer).
    Differs {
        /// The first differing sample (interleaved index).
        at: usize,
    },
    /// Rate or channel count differ.
    Format,
}

impl Match {
    /// Exact or an exact prefix with at least one frame.
    pub fn is_sample_exact(self) -> bool {
        matches!(self, Self::Exact) || matches!(self, Self::Prefix { frames } if frames > 0)
    }
}

impl std::fmt::Display for Match {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact => f.write_str("sample-exact"),
            Self::Prefix { frames } => write!(f, "sample-exact for the {frames} frames received"),
            Self::Differs { at } => write!(f, "differs from sample {at} on"),
            Self::Format => f.write_str("differs in rate or channels"),
        }
    }
}

impl Audio {
    /// Compares `received` with this (sent) audio. For PCMU compare with
    /// [`Audio::through_pcmu`] of the sent audio.
    pub fn compare(&self, received: &Self) -> Match {
        if (self.rate, self.channels) != (received.rate, received.channels) {
            return Match::Format;
        }
        if let Some(at) = self
            .samples
            .iter()
            .zip(&received.samples)
            .position(|(sent, got)| sent != got)
        {
            return Match::Differs { at };
        }
        match received.samples.len().cmp(&self.samples.len()) {
            std::cmp::Ordering::Equal => Match::Exact,
            std::cmp::Ordering::Less => Match::Prefix {
                frames: received.frames(),
            },
            std::cmp::Ordering::Greater => Match::Differs {
                at: self.samples.len(),
            },
        }
    }
}

fn to_16_bits(value: i32, bits: u16) -> i16 {
    let value = match bits {
        // 8-bit WAV samples are unsigned; hound already centres them on 0.
        8 => value << 8,
        24 => value >> 8,
        32 => value >> 16,
        _ => value,
    };
    i16::try_from(value.clamp(i32::from(i16::MIN), i32::from(i16::MAX))).unwrap_or(0)
}

fn float_to_16_bits(value: f32) -> i16 {
    round_to_i16(f64::from(value.clamp(-1.0, 1.0)) * 32767.0)
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "clamped to the i16 range first"
)]
fn round_to_i16(value: f64) -> i16 {
    value
        .round()
        .clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16
}

/// Received audio put in place by RTP timestamp: a reordered packet lands where it belongs, a
/// lost one leaves silence, a duplicate overwrites itself. At most `max_frames` frames are kept.
#[derive(Debug, Clone)]
pub struct Reassembly {
    channels: usize,
    max_frames: usize,
    first: Option<u32>,
    samples: Vec<i16>,
    /// Samples that fell outside the kept range.
    pub discarded: u64,
}

impl Reassembly {
    /// An empty buffer for `channels` interleaved channels.
    pub fn new(channels: u16, max_frames: usize) -> Self {
        Self {
            channels: usize::from(channels.max(1)),
            max_frames,
            first: None,
            samples: Vec::new(),
            discarded: 0,
        }
    }

    /// Puts `samples` (interleaved) at the frame of RTP timestamp `timestamp`.
    pub fn place(&mut self, timestamp: u32, samples: &[i16]) {
        let first = *self.first.get_or_insert(timestamp);
        let mut offset = i64::from(timestamp.wrapping_sub(first).cast_signed());
        if offset < 0 {
            // A packet from before the first one received: make room at the front.
            let shift = usize::try_from(offset.unsigned_abs()).unwrap_or(usize::MAX);
            if shift.saturating_add(self.samples.len() / self.channels) > self.max_frames {
                self.discarded += u64::try_from(samples.len()).unwrap_or(u64::MAX);
                return;
            }
            self.samples
                .splice(0..0, std::iter::repeat_n(0, shift * self.channels));
            self.first = Some(timestamp);
            offset = 0;
        }
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let room = self.max_frames.saturating_sub(start) * self.channels;
        let kept = &samples[..samples.len().min(room)];
        self.discarded += u64::try_from(samples.len() - kept.len()).unwrap_or(u64::MAX);
        if kept.is_empty() {
            return;
        }
        let start = start * self.channels;
        let end = start + kept.len();
        if self.samples.len() < end {
            self.samples.resize(end, 0);
        }
        self.samples[start..end].copy_from_slice(kept);
    }

    /// The samples so far.
    pub fn samples(&self) -> &[i16] {
        &self.samples
    }

    /// The samples, ending the reassembly.
    pub fn into_samples(self) -> Vec<i16> {
        self.samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_known_values() {
        assert_eq!(ulaw_decode(0xff), 0);
        assert_eq!(ulaw_decode(0x7f), 0);
        assert_eq!(ulaw_decode(0x80), 32124);
        assert_eq!(ulaw_decode(0x00), -32124);
        assert_eq!(ulaw_decode(0xf0), 120);
        assert_eq!(ulaw_encode(0), 0xff);
        assert_eq!(ulaw_encode(32767), 0x80);
        assert_eq!(ulaw_encode(-32768), 0x00);
        assert_eq!(ulaw_encode(-1), 0x7f);
    }

    #[test]
    fn ulaw_round_trips_every_code() {
        for octet in 0..=u8::MAX {
            let value = ulaw_decode(octet);
            assert_eq!(ulaw_decode(ulaw_encode(value)), value, "{octet:#04x}");
        }
        // Encoding is monotonic in the magnitude.
        let mut last = 0;
        for sample in (0..=i16::MAX).step_by(97) {
            let decoded = ulaw_decode(ulaw_encode(sample));
            assert!(decoded >= last, "{sample}");
            assert!(
                (i32::from(decoded) - i32::from(sample)).abs() <= 1024,
                "{sample}"
            );
            last = decoded;
        }
    }

    #[test]
    fn l16_is_big_endian() {
        let mut payload = Vec::new();
        Codec::L16.encode(&[1, -2, 0x1234], &mut payload);
        assert_eq!(payload, [0, 1, 0xff, 0xfe, 0x12, 0x34]);
        let mut samples = Vec::new();
        // The odd trailing octet is ignored.
        payload.push(9);
        Codec::L16.decode(&payload, &mut samples);
        assert_eq!(samples, [1, -2, 0x1234]);
    }

    #[test]
    fn codec_names_and_static_types() {
        assert_eq!(Codec::from_encoding_name("pcmu"), Some(Codec::Pcmu));
        assert_eq!(Codec::from_encoding_name("L16"), Some(Codec::L16));
        assert_eq!(Codec::from_encoding_name("opus"), None);
        assert_eq!(
            Codec::from_static_payload_type(0),
            Some((Codec::Pcmu, 8000, 1))
        );
        assert_eq!(Codec::from_static_payload_type(96), None);
    }

    #[test]
    fn tone_is_deterministic_and_sized() {
        let tone = Audio::tone(8000, 0.5, 440.0);
        assert_eq!(tone.frames(), 4000);
        assert_eq!(tone, Audio::tone(8000, 0.5, 440.0));
        assert_eq!(tone.duration(), Duration::from_millis(500));
        assert!(tone.samples.iter().any(|&s| s > 16000));
    }

    #[test]
    fn wav_round_trip() {
        let dir = std::env::temp_dir().join(format!("rtsp-audio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tone.wav");
        let audio = Audio {
            rate: 16000,
            channels: 2,
            samples: vec![1, -1, 300, -300, i16::MAX, i16::MIN],
        };
        audio.write_wav(&path).unwrap();
        assert_eq!(Audio::read_wav(&path).unwrap(), audio);
        std::fs::write(&path, b"RIFF garbage").unwrap();
        assert!(matches!(
            Audio::read_wav(&path),
            Err(AudioError::Wav { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reassembly_places_by_timestamp() {
        let mut audio = Reassembly::new(1, 100);
        audio.place(1000, &[1, 2]);
        audio.place(1004, &[5, 6]); // 1002..1004 lost
        audio.place(1002, &[3, 4]); // arrives late
        audio.place(1004, &[5, 6]); // duplicate
        assert_eq!(audio.samples(), [1, 2, 3, 4, 5, 6]);
        audio.place(998, &[-1, 0]); // before the first
        assert_eq!(audio.samples(), [-1, 0, 1, 2, 3, 4, 5, 6]);
        // Past the limit: cut.
        audio.place(998 + 99, &[7, 8, 9]);
        assert_eq!(audio.samples().len(), 100);
        assert_eq!(audio.discarded, 2);
        // Far in the past (wrapped far ahead): discarded.
        audio.place(998u32.wrapping_sub(1_000_000), &[1]);
        assert_eq!(audio.discarded, 3);
    }

    #[test]
    fn comparisons() {
        let sent = Audio::tone(8000, 0.01, 440.0);
        assert_eq!(sent.compare(&sent), Match::Exact);
        let mut shorter = sent.clone();
        shorter.samples.truncate(40);
        assert_eq!(sent.compare(&shorter), Match::Prefix { frames: 40 });
        assert!(sent.compare(&shorter).is_sample_exact());
        let mut changed = sent.clone();
        changed.samples[7] ^= 1;
        assert_eq!(sent.compare(&changed), Match::Differs { at: 7 });
        let mut longer = sent.clone();
        longer.samples.push(0);
        assert!(!sent.compare(&longer).is_sample_exact());
        let other_rate = Audio {
            rate: 16000,
            ..sent.clone()
        };
        assert_eq!(sent.compare(&other_rate), Match::Format);
        assert_eq!(sent.compare(&sent.through_pcmu()), Match::Differs { at: 1 });
    }

    #[test]
    fn reassembly_of_stereo_frames() {
        let mut audio = Reassembly::new(2, 10);
        audio.place(0, &[1, 2, 3, 4]);
        audio.place(3, &[7, 8]);
        assert_eq!(audio.into_samples(), [1, 2, 3, 4, 0, 0, 7, 8]);
    }
}
