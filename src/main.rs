//! The `mergesmith` command-line tool; see `mergesmith --help`.

fn main() -> std::process::ExitCode {
    mergesmith::cli::main()
}
