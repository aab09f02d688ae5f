//! Helper for the cross-process ring benchmark: offers COUNT records of SIZE bytes to the
//! record ring at PATH, spinning while it is full. MODE is `many` or `single`.

use intergroup_ring::{OfferError, RecordProducer, SingleProducer};
use std::path::Path;

enum Either {
    Many(RecordProducer),
    Single(SingleProducer),
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, path, count, size, mode] = args.as_slice() else {
        eprintln!("usage: ring-producer PATH COUNT SIZE many|single");
        std::process::exit(2);
    };
    let (Ok(count), Ok(size)) = (count.parse::<u64>(), size.parse::<usize>()) else {
        eprintln!("ring-producer: COUNT and SIZE must be numbers");
        std::process::exit(2);
    };
    let opened = match mode.as_str() {
        "single" => SingleProducer::open(Path::new(path)).map(Either::Single),
        _ => RecordProducer::open(Path::new(path)).map(Either::Many),
    };
    let mut producer = match opened {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ring-producer: {e}");
            std::process::exit(1);
        }
    };
    let record = vec![0x5au8; size];
    for _ in 0..count {
        loop {
            let offered = match &mut producer {
                Either::Many(p) => p.offer(1, &record),
                Either::Single(p) => p.offer(1, &record),
            };
            match offered {
                Ok(()) => break,
                Err(OfferError::WouldBlock) => {
                    // The same idle as the benchmark's consumers: pause, then yield.
                    for _ in 0..512 {
                        std::hint::spin_loop();
                    }
                    std::thread::yield_now();
                }
                Err(e) => {
                    eprintln!("ring-producer: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
}
