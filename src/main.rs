use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = hyrelay::cli::Cli::parse();
    match hyrelay::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
