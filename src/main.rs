fn main() {
    eprintln!("worker-candle: not implemented yet");
    std::process::exit(2);
}
