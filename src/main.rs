use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = hyrelay::cli::Cli::parse();
    match hyrelay::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", hyrelay::cli::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
