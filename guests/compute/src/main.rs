//! `compute`: CPU-bound ring-3 work, a few seconds by default. Each round sieves primes
//! over a 4 MiB byte array and runs a serial mixing hash over a 4 MiB word array that
//! feeds on the sieve; the final state is the digest. `compute.rounds=N` sets the work.

#![no_std]
#![no_main]

use core::hint::black_box;

use ftvm_guest_kit::digest::{mix64, Digest};
use ftvm_guest_kit::{cmdline, entry, mem, println, time};

entry!(main);

const DEFAULT_ROUNDS: u64 = 200;
/// Sieve flags, one byte per number.
const SIEVE_BYTES: usize = 4 << 20;
/// Mixing words: as many bytes as the sieve, so each word takes 8 flags.
const MIX_WORDS: usize = SIEVE_BYTES / 8;

fn main() {
    let rounds = cmdline::param_u64_or("compute.rounds", DEFAULT_ROUNDS);
    println!(
        "compute: {rounds} rounds of a {} MiB sieve and a {} MiB mixing pass",
        SIEVE_BYTES >> 20,
        (MIX_WORDS * 8) >> 20
    );
    let sieve = mem::alloc_zeroed(SIEVE_BYTES, 64);
    let words = mem::alloc_u64(MIX_WORDS);

    // Everything depends on the round count read at run time: nothing can be folded away.
    let mut state = mix64(black_box(rounds) ^ 0x6674_766d_2d63_6f6d);
    let mut primes_total = 0u64;
    let start = time::ticks();
    for round in 0..rounds {
        // Vary the sieve bound a little from round to round.
        let limit = SIEVE_BYTES - (state % 4096) as usize;
        let primes = sieve_round(&mut sieve[..limit]);
        primes_total += primes;
        state = mix_round(words, sieve, state ^ primes ^ round);
    }
    let ticks = time::ticks() - start;

    let mut digest = Digest::new();
    digest.write_u64(rounds);
    digest.write_u64(state);
    digest.write_u64(primes_total);
    for &word in words.iter().step_by(997) {
        digest.write_u64(word);
    }
    println!("digest: compute rounds={rounds} {digest}");
    println!("ticks: {ticks} ({} ms at {} Hz)", time::ticks_to_ms(ticks), time::TICK_HZ);
}

/// Sieve of Eratosthenes over `flags` (1 = prime); returns the number of primes below
/// `flags.len()`.
fn sieve_round(flags: &mut [u8]) -> u64 {
    let n = flags.len();
    flags.fill(1);
    flags[0] = 0;
    flags[1] = 0;
    let mut i = 2;
    while i * i < n {
        if flags[i] != 0 {
            let mut j = i * i;
            while j < n {
                flags[j] = 0;
                j += i;
            }
        }
        i += 1;
    }
    flags.iter().map(|&f| u64::from(f)).sum()
}

/// One serial pass over `words`: each word is folded into the running state together with
/// the eight sieve flags at the same offset, and replaced by the new state.
fn mix_round(words: &mut [u64], flags: &[u8], seed: u64) -> u64 {
    let mut state = seed;
    for (word, chunk) in words.iter_mut().zip(flags.chunks_exact(8)) {
        let bits = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        state = mix64(state ^ *word ^ bits).rotate_left(17);
        *word = state;
    }
    state
}
