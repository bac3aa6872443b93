use clap::Parser;

fn main() {
    vdim::home::private_umask();
    let cli = vdim::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VDIM_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs piped to a file or a test stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let json = cli.global.json;
    if let Err(err) = vdim::cli::run(cli) {
        eprintln!("{}", vdim::error::render(&err, json));
        std::process::exit(vdim::cli::exit_code(&err));
    }
}
