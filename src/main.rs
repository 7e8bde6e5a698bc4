//! The `mergesmith` command-line tool; see `mergesmith --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
