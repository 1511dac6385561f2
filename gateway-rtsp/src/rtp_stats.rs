//! Reception statistics of one RTP stream (RFC 3550 appendix A.1, A.3 and A.8): packets
//! received, lost, reordered and duplicated, and the interarrival jitter; and the report block a
//! receiver report carries.
//!
//! Pure: the caller passes each packet's sequence number, RTP timestamp and arrival time (any
//! monotonic origin); nothing here reads a clock.

use std::time::Duration;

use super::rtp::ReportBlock;

/// How many recent sequence numbers are remembered to tell duplicates from late packets.
const WINDOW: i64 = 1024;

/// What one packet was, relative to the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The first packet, or one with a higher sequence number than any before (in order).
    InOrder,
    /// A packet older than the highest one received: reordered (or very late).
    Late,
    /// A sequence number already received.
    Duplicate,
}

/// Counters of one stream, for people and tests.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StreamStats {
    /// Distinct packets received.
    pub received: u64,
    /// Packets expected from the lowest to the highest sequence number seen.
    pub expected: u64,
    /// `expected - received` (never negative: duplicates are counted apart).
    pub lost: u64,
    /// Packets that arrived after a packet with a higher sequence number.
    pub reordered: u64,
    /// Packets received twice or more.
    pub duplicates: u64,
    /// Interarrival jitter (RFC 3550 A.8) in timestamp units.
    pub jitter: f64,
    /// The same in milliseconds.
    pub jitter_ms: f64,
}

/// Sequence and timing state of one RTP source.
#[derive(Debug, Clone)]
pub struct Reception {
    clock_rate: u32,
    /// Extended sequence numbers (cycles counted) of the lowest and highest packets seen.
    lowest: i64,
    highest: i64,
    received: u64,
    reordered: u64,
    duplicates: u64,
    /// Bit `ext % WINDOW` set: that sequence number was received (within the window below
    /// `highest`).
    seen: Vec<u64>,
    jitter: f64,
    last_transit: Option<i64>,
    /// `expected` and `received` at the previous report (RFC 3550 A.3).
    expected_prior: u64,
    received_prior: u64,
    started: bool,
}

impl Reception {
    /// A stream with this RTP clock rate (Hz, at least 1).
    pub fn new(clock_rate: u32) -> Self {
        Self {
            clock_rate: clock_rate.max(1),
            lowest: 0,
            highest: 0,
            received: 0,
            reordered: 0,
            duplicates: 0,
            seen: vec![0; usize::try_from(WINDOW / 64).unwrap_or(16)],
            jitter: 0.0,
            last_transit: None,
            expected_prior: 0,
            received_prior: 0,
            started: false,
        }
    }

    /// The stream's RTP clock rate.
    pub fn clock_rate(&self) -> u32 {
        self.clock_rate
    }

    fn slot(ext: i64) -> (usize, u64) {
        let index = ext.rem_euclid(WINDOW);
        let word = usize::try_from(index / 64).unwrap_or(0);
        (word, 1 << (index % 64))
    }

    fn mark(&mut self, ext: i64) {
        let (word, bit) = Self::slot(ext);
        self.seen[word] |= bit;
    }

    fn is_seen(&self, ext: i64) -> bool {
        let (word, bit) = Self::slot(ext);
        self.seen[word] & bit != 0
    }

    /// Accounts for one packet with `sequence` and `timestamp` that arrived at `arrival`.
    pub fn on_packet(&mut self, sequence: u16, timestamp: u32, arrival: Duration) -> Arrival {
        let ext = if self.started {
            // The extended number closest to the highest so far (handles wrap-around both ways).
            let delta = i64::from(sequence.wrapping_sub(self.highest_low16()).cast_signed());
            self.highest + delta
        } else {
            self.started = true;
            self.lowest = i64::from(sequence);
            self.highest = i64::from(sequence);
            i64::from(sequence)
        };
        let arrival_kind = if ext > self.highest {
            // Forget what the window no longer covers before marking.
            let advance = ext - self.highest;
            if advance >= WINDOW {
                self.seen.iter_mut().for_each(|word| *word = 0);
            } else {
                for cleared in self.highest + 1..=ext {
                    let (word, bit) = Self::slot(cleared);
                    self.seen[word] &= !bit;
                }
            }
            self.highest = ext;
            Arrival::InOrder
        } else if ext == self.highest && self.received == 0 {
            Arrival::InOrder
        } else if self.highest - ext < WINDOW && self.is_seen(ext) {
            self.duplicates += 1;
            return Arrival::Duplicate;
        } else {
            self.reordered += 1;
            Arrival::Late
        };
        self.lowest = self.lowest.min(ext);
        self.mark(ext);
        self.received += 1;
        self.update_jitter(timestamp, arrival);
        arrival_kind
    }

    fn highest_low16(&self) -> u16 {
        u16::try_from(self.highest.rem_euclid(1 << 16)).unwrap_or(0)
    }

    /// RFC 3550 A.8: J += (|D| - J) / 16, with D the change in relative transit time.
    fn update_jitter(&mut self, timestamp: u32, arrival: Duration) {
        let arrival_units = arrival.as_nanos() * u128::from(self.clock_rate) / 1_000_000_000;
        // Transit times are compared modulo 2^32, like the timestamps they are made of.
        let arrival_units = u32::try_from(arrival_units % (1 << 32)).unwrap_or(0);
        let transit = i64::from(arrival_units.wrapping_sub(timestamp).cast_signed());
        if let Some(last) = self.last_transit {
            let d = i64::from(
                u32::try_from((transit - last).rem_euclid(1 << 32))
                    .unwrap_or(0)
                    .cast_signed(),
            );
            #[expect(
                clippy::cast_precision_loss,
                reason = "transit differences are far below 2^52"
            )]
            let d = d.unsigned_abs() as f64;
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.last_transit = Some(transit);
    }

    /// Packets expected so far (RFC 3550 A.3).
    fn expected(&self) -> u64 {
        if self.received == 0 {
            0
        } else {
            u64::try_from(self.highest - self.lowest + 1).unwrap_or(0)
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> StreamStats {
        let expected = self.expected();
        StreamStats {
            received: self.received,
            expected,
            lost: expected.saturating_sub(self.received),
            reordered: self.reordered,
            duplicates: self.duplicates,
            jitter: self.jitter,
            jitter_ms: self.jitter * 1000.0 / f64::from(self.clock_rate),
        }
    }

    /// The report block on source `ssrc` for a receiver report sent now, with `last_sr` and
    /// `delay_since_last_sr` from the last sender report (zeros if none). Starts a new interval
    /// for the fraction lost.
    pub fn report_block(
        &mut self,
        ssrc: u32,
        last_sr: u32,
        delay_since_last_sr: u32,
    ) -> ReportBlock {
        let expected = self.expected();
        let expected_interval = expected.saturating_sub(self.expected_prior);
        let received_interval = self.received.saturating_sub(self.received_prior);
        self.expected_prior = expected;
        self.received_prior = self.received;
        let lost_interval = expected_interval.saturating_sub(received_interval);
        let fraction_lost = if expected_interval == 0 || lost_interval == 0 {
            0
        } else {
            u8::try_from((lost_interval << 8) / expected_interval).unwrap_or(u8::MAX)
        };
        let cumulative = i64::try_from(expected).unwrap_or(i64::MAX)
            - i64::try_from(self.received).unwrap_or(i64::MAX);
        ReportBlock {
            ssrc,
            fraction_lost,
            cumulative_lost: i32::try_from(cumulative).unwrap_or(i32::MAX),
            // cycles << 16 | sequence, modulo 2^32.
            highest_sequence: u32::try_from(self.highest.rem_euclid(1 << 32)).unwrap_or(0),
            jitter: jitter_field(self.jitter),
            last_sr,
            delay_since_last_sr,
        }
    }
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "clamped to the u32 range first"
)]
fn jitter_field(jitter: f64) -> u32 {
    jitter.clamp(0.0, f64::from(u32::MAX)) as u32
}

/// A delay as DLSR units (1/65536 s), saturating.
pub fn dlsr_units(delay: Duration) -> u32 {
    u32::try_from(delay.as_micros() * 65536 / 1_000_000).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS20: Duration = Duration::from_millis(20);

    /// Packets at 8 kHz, 160 samples (20 ms) apart, arriving exactly on time.
    fn feed(reception: &mut Reception, sequences: &[u16]) -> Vec<Arrival> {
        sequences
            .iter()
            .map(|&seq| {
                let index = u32::from(seq.wrapping_sub(sequences[0]));
                reception.on_packet(seq, 1000 + index * 160, MS20 * index)
            })
            .collect()
    }

    #[test]
    fn in_order_stream_has_no_loss_and_no_jitter() {
        let mut reception = Reception::new(8000);
        feed(&mut reception, &(100..150).collect::<Vec<_>>());
        let stats = reception.stats();
        assert_eq!((stats.received, stats.expected, stats.lost), (50, 50, 0));
        assert_eq!((stats.reordered, stats.duplicates), (0, 0));
        assert!(stats.jitter < 1e-9, "{stats:?}");
    }

    #[test]
    fn gaps_are_lost_late_packets_are_reordered_repeats_are_duplicates() {
        let mut reception = Reception::new(8000);
        let arrivals = feed(&mut reception, &[1, 2, 4, 3, 5, 5, 8]);
        assert_eq!(
            arrivals,
            [
                Arrival::InOrder,
                Arrival::InOrder,
                Arrival::InOrder,
                Arrival::Late,
                Arrival::InOrder,
                Arrival::Duplicate,
                Arrival::InOrder
            ]
        );
        let stats = reception.stats();
        assert_eq!(stats.expected, 8);
        assert_eq!(stats.received, 6);
        assert_eq!(stats.lost, 2);
        assert_eq!((stats.reordered, stats.duplicates), (1, 1));
    }

    #[test]
    fn sequence_wrap_is_followed_and_extended() {
        let mut reception = Reception::new(8000);
        feed(&mut reception, &[65534, 65535, 0, 1]);
        let stats = reception.stats();
        assert_eq!((stats.expected, stats.lost), (4, 0));
        let block = reception.report_block(5, 0, 0);
        assert_eq!(block.highest_sequence, (1 << 16) | 1);
        // A late packet from before the wrap.
        let mut reception = Reception::new(8000);
        feed(&mut reception, &[65535, 1, 0]);
        reception.on_packet(65533, 0, Duration::ZERO);
        let stats = reception.stats();
        assert_eq!((stats.expected, stats.received, stats.reordered), (5, 4, 2));
    }

    #[test]
    fn a_packet_before_the_first_extends_the_expected_range() {
        let mut reception = Reception::new(8000);
        feed(&mut reception, &[10, 9]);
        let stats = reception.stats();
        assert_eq!((stats.expected, stats.lost, stats.reordered), (2, 0, 1));
    }

    #[test]
    fn jitter_follows_rfc3550_a8() {
        // Every other packet 8 ms late: |D| alternates 64 units (8 ms at 8 kHz).
        let mut reception = Reception::new(8000);
        let mut expected = 0.0;
        for index in 0u32..200 {
            let late = if index % 2 == 1 {
                Duration::from_millis(8)
            } else {
                Duration::ZERO
            };
            reception.on_packet(
                u16::try_from(index).unwrap(),
                index * 160,
                MS20 * index + late,
            );
            if index > 0 {
                expected += (64.0 - expected) / 16.0;
            }
        }
        let stats = reception.stats();
        assert!((stats.jitter - expected).abs() < 1.0, "{stats:?}");
        assert!((stats.jitter_ms - expected / 8.0).abs() < 0.2, "{stats:?}");
        assert!(stats.jitter > 60.0, "converges on |D|: {stats:?}");
    }

    #[test]
    fn report_blocks_carry_interval_loss_and_cumulative_loss() {
        let mut reception = Reception::new(8000);
        // 10 expected, 8 received: 2 lost, fraction 2/10 * 256 = 51.
        feed(&mut reception, &[0, 1, 2, 3, 5, 6, 7, 9]);
        let block = reception.report_block(0xabc, 0x1111, dlsr_units(MS20 * 50));
        assert_eq!(block.ssrc, 0xabc);
        assert_eq!(block.cumulative_lost, 2);
        assert_eq!(block.fraction_lost, 51);
        assert_eq!(block.highest_sequence, 9);
        assert_eq!((block.last_sr, block.delay_since_last_sr), (0x1111, 65536));
        // Next interval without loss.
        reception.on_packet(10, 0, Duration::ZERO);
        reception.on_packet(11, 160, MS20);
        let block = reception.report_block(0xabc, 0, 0);
        assert_eq!((block.fraction_lost, block.cumulative_lost), (0, 2));
    }

    #[test]
    fn a_big_jump_clears_the_duplicate_window() {
        let mut reception = Reception::new(8000);
        reception.on_packet(0, 0, Duration::ZERO);
        reception.on_packet(1000, 0, Duration::ZERO);
        assert_eq!(
            reception.on_packet(0, 0, Duration::ZERO),
            Arrival::Duplicate
        );
        reception.on_packet(5000, 0, Duration::ZERO);
        // 4096 has the window slot of 0, which the jump cleared.
        assert_eq!(reception.on_packet(4096, 0, Duration::ZERO), Arrival::Late);
        assert_eq!(
            reception.on_packet(4096, 0, Duration::ZERO),
            Arrival::Duplicate
        );
    }
}
