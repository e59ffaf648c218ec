//! The `stacyvm` command: `serve`, `migrate`, `image ...`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;
use serde_json::{Map, Value, json};

use stacyvm::app::{self, App};
use stacyvm::config::Config;

/// StacyVM: disposable, isolated sandboxes for AI agents and code runners.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (default: ./stacyvm.yaml or ~/.stacyvm/config.yaml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Where the database, images and native sandboxes live.
    #[arg(long, global = true, env = "STACYVM_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// `sqlite://...` or `postgres://...` (default: <data-dir>/stacyvm.db).
    #[arg(long, global = true, env = "STACYVM_DATABASE_URL")]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API server, scheduler, local worker and providers.
    Serve {
        /// Address to bind (loopback unless you say otherwise).
        #[arg(long)]
        host: Option<String>,
        /// Port to listen on (default 7423).
        #[arg(long)]
        port: Option<u16>,
        /// Default provider: auto, docker, native, proot, qemu, firecracker or a custom one.
        #[arg(long)]
        provider: Option<String>,
        /// Run no worker in this process: every sandbox lives on a
        /// `stacyvm worker` (config `worker.local: false`).
        #[arg(long)]
        no_local_worker: bool,
    },
    /// Run a worker: this host's providers, serving a control plane.
    Worker {
        /// The control plane's URL, e.g. http://10.0.0.1:7423.
        #[arg(long)]
        control_plane: Option<String>,
        /// Where the worker RPC listens, HOST:PORT.
        #[arg(long)]
        listen: Option<String>,
        /// The URL the control plane reaches this worker at (default:
        /// http://<listen>).
        #[arg(long)]
        advertise: Option<String>,
        /// This worker's id; the control plane's auth.worker_tokens needs it.
        #[arg(long)]
        id: Option<String>,
        /// The token shared with the control plane.
        #[arg(long, env = "STACYVM_WORKER_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Providers to offer (repeat or comma-separate); default: all.
        #[arg(long, value_delimiter = ',')]
        provider: Vec<String>,
        /// A label KEY=VALUE describing this worker (repeat for more).
        #[arg(long, value_parser = parse_label)]
        label: Vec<(String, String)>,
        /// Most live sandboxes this worker takes (default: no limit).
        #[arg(long)]
        max_sandboxes: Option<u32>,
    },
    /// Cordon, uncordon, drain and list the workers of a running control
    /// plane (admin API).
    Workers {
        /// The control plane's URL.
        #[arg(long, env = "STACYVM_URL", default_value = "http://127.0.0.1:7423")]
        server: String,
        /// An admin key, sent as X-Admin-API-Key.
        #[arg(long, env = "STACYVM_ADMIN_API_KEY", hide_env_values = true)]
        admin_key: Option<String>,
        #[command(subcommand)]
        command: WorkersCommand,
    },
    /// Create, list, inspect, run commands in and remove sandboxes on a
    /// running server.
    Sandbox {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: SandboxCommand,
    },
    /// Copy, list and print files of a sandbox (`SANDBOX_ID:/path`).
    Files {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: FilesCommand,
    },
    /// An interactive terminal in a sandbox (its shell, or COMMAND): keys,
    /// resizes and Ctrl-C reach it; exits with its exit status.
    Shell {
        #[command(flatten)]
        api: ApiArgs,
        /// The sandbox.
        id: String,
        /// Come back to a session left open (its output is replayed).
        #[arg(long)]
        session: Option<String>,
        /// A shell command line to run instead of the sandbox's shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// An MCP server on stdin/stdout for agents: tools to create sandboxes,
    /// run commands, use files and destroy sandboxes, each a REST call to
    /// the server with your key. (The server also serves MCP over
    /// streamable HTTP at /mcp.)
    Mcp {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Serve one of this host's providers behind StacyVM's custom provider
    /// contract (the reference implementation of `providers.custom`).
    CustomProvider {
        /// Where to listen, HOST:PORT (loopback unless you say otherwise).
        #[arg(long, default_value = "127.0.0.1:7480")]
        listen: String,
        /// The provider served: native, proot or docker.
        #[arg(long)]
        provider: String,
        /// The key callers must send as `Authorization: Bearer`.
        #[arg(long, env = "STACYVM_CUSTOM_PROVIDER_KEY", hide_env_values = true)]
        api_key: String,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Print the GraphQL schema (SDL), as committed in schema.graphql.
    Schema,
    /// Print the REST API's OpenAPI 3.1 document, as committed in
    /// openapi.json (the server serves it at /api/v1/openapi.json).
    Openapi,
    /// Runtime certification of this host: each provider (or one) taken
    /// through a sandbox's life, one timed check per line; exits non-zero
    /// if a required check fails. The result is kept in the data dir and
    /// shown by /api/v1/providers.
    Certify {
        /// Only this provider.
        #[arg(long)]
        provider: Option<String>,
        /// The image to spawn (default: defaults.image, else an imported one).
        #[arg(long)]
        image: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure StacyVM beside the raw runtime (Docker Engine API, fork+exec)
    /// in one run; prints a Markdown table.
    Bench {
        /// Fewer iterations: figures in seconds, not conclusions.
        #[arg(long)]
        quick: bool,
        /// The docker image sandboxes and raw containers use.
        #[arg(long, default_value = "busybox:latest")]
        image: String,
        /// A rootfs tarball for the native provider (skipped without one).
        #[arg(long)]
        rootfs: Option<PathBuf>,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Live records for the control-plane scale part (memory provider;
        /// default 10000, 1000 with --quick; 0 skips it).
        #[arg(long)]
        scale: Option<usize>,
        /// Idle GraphQL subscriptions held at once in the scale part
        /// (default 1000, 200 with --quick).
        #[arg(long)]
        subscriptions: Option<usize>,
    },
    /// Manage API keys (only hashes are stored; a key is printed once).
    Keys {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Manage the local image store used by the native and proot providers.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key for an owner and print it (once).
    Create {
        /// The owner the key acts as (1 to 128 characters).
        #[arg(long)]
        owner: String,
        /// admin, operator, viewer or owner.
        #[arg(long, default_value = "owner")]
        role: String,
        /// Shorthand for --role admin.
        #[arg(long)]
        admin: bool,
        /// The owner's tenant (default: the default tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime as a Go duration, e.g. 720h; default: no expiry.
        #[arg(long)]
        expires: Option<String>,
        /// Let the key name its pool-mode user with X-User-ID.
        #[arg(long)]
        allow_user_header: bool,
    },
    /// List keys (by prefix; never the keys themselves).
    List,
    /// Revoke a key by id or prefix.
    Revoke {
        /// The key's id or its printed prefix (svm_...).
        id_or_prefix: String,
    },
}

/// Where the server is and who calls it.
#[derive(clap::Args)]
struct ApiArgs {
    /// The server's URL.
    #[arg(long, env = "STACYVM_SERVER", default_value = "http://127.0.0.1:7423")]
    server: String,
    /// An API key, sent as X-API-Key.
    #[arg(long, env = "STACYVM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print the API's JSON answers (for scripts).
    #[arg(long, global = true)]
    json: bool,
}

impl ApiArgs {
    fn target(&self) -> stacyvm::cli::Target {
        stacyvm::cli::Target {
            server: self.server.clone(),
            api_key: self.api_key.clone().filter(|k| !k.is_empty()),
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Create a sandbox and print its id (the whole sandbox with --json).
    Create {
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        /// Spawn from this template.
        #[arg(long)]
        template: Option<String>,
        /// Time to live, as a Go duration (30m, 2h).
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        memory_mb: Option<u32>,
        #[arg(long)]
        vcpus: Option<u32>,
        /// Metadata KEY=VALUE (repeat for more).
        #[arg(long = "meta")]
        metadata: Vec<String>,
    },
    /// List your sandboxes.
    Ls,
    /// Show one sandbox.
    Get { id: String },
    /// Run a command, its output live; exits with the command's exit code
    /// (124 when it timed out).
    Exec {
        id: String,
        /// Run the words through `sh -c` (pipes, globs, variables).
        #[arg(long)]
        shell: bool,
        /// An environment variable KEY=VALUE (repeat for more).
        #[arg(long)]
        env: Vec<String>,
        /// The working directory (absolute).
        #[arg(long)]
        workdir: Option<String>,
        /// Kill the command after this long (Go duration).
        #[arg(long)]
        timeout: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Destroy sandboxes.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Print a sandbox's logs.
    Logs {
        id: String,
        #[arg(long, default_value_t = 100)]
        lines: u32,
    },
    /// Set a sandbox to expire TTL from now.
    Extend { id: String, ttl: String },
}

#[derive(Subcommand)]
enum FilesCommand {
    /// Copy LOCAL SANDBOX_ID:/path or SANDBOX_ID:/path LOCAL (`-`: stdin or
    /// stdout); binary-safe.
    Cp { from: String, to: String },
    /// List a directory: SANDBOX_ID:/path.
    Ls { path: String },
    /// Print a file: SANDBOX_ID:/path.
    Cat { path: String },
}

#[derive(Subcommand)]
enum WorkersCommand {
    /// List workers with their state and sandboxes.
    List,
    /// No new sandboxes on the worker; its sandboxes run on.
    Cordon {
        /// The worker's id.
        id: String,
    },
    /// Let the worker take new sandboxes again.
    Uncordon {
        /// The worker's id.
        id: String,
    },
    /// Cordon the worker until its sandboxes are gone.
    Drain {
        /// The worker's id.
        id: String,
        /// Return only once the worker has no sandbox left.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, as a Go duration.
        #[arg(long, default_value = "1h")]
        timeout: String,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Import a root filesystem tarball (as `docker export` writes it; plain
    /// or gzip-compressed).
    Import {
        /// The image name sandboxes ask for, e.g. alpine:3.19.
        name: String,
        /// The tarball: .tar or .tar.gz.
        tarball: PathBuf,
    },
    /// List imported images.
    List,
    /// Remove an image.
    Rm {
        /// The image name.
        name: String,
    },
}

/// `KEY=VALUE` (see `stacyvm::worker::labels`).
fn parse_label(text: &str) -> Result<(String, String), String> {
    stacyvm::worker::labels::parse(text)
}

/// Flags that were given, as a config layer above everything else.
fn overrides(cli: &Cli) -> Figment {
    let mut root = Map::new();
    if let Some(dir) = &cli.data_dir {
        root.insert("data_dir".into(), json!(dir));
    }
    if let Some(url) = &cli.database_url {
        root.insert("database".into(), json!({ "url": url }));
    }
    if let Command::Worker {
        control_plane,
        listen,
        advertise,
        id,
        token,
        provider,
        label,
        max_sandboxes,
    } = &cli.command
    {
        let mut worker = Map::new();
        let mut put = |key: &str, value: &Option<String>| {
            if let Some(value) = value {
                worker.insert(key.into(), json!(value));
            }
        };
        put("control_plane", control_plane);
        put("listen", listen);
        put("advertise", advertise);
        put("id", id);
        put("token", token);
        if !provider.is_empty() {
            worker.insert("providers".into(), json!(provider));
        }
        if let Some(max) = max_sandboxes {
            worker.insert("max_sandboxes".into(), json!(max));
        }
        if !label.is_empty() {
            let labels: Map<String, Value> =
                label.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            worker.insert("labels".into(), Value::Object(labels));
        }
        root.insert("worker".into(), Value::Object(worker));
    }
    if let Command::Serve {
        host,
        port,
        provider,
        no_local_worker,
    } = &cli.command
    {
        if *no_local_worker {
            root.insert("worker".into(), json!({ "local": false }));
        }
        let mut server = Map::new();
        if let Some(host) = host {
            server.insert("host".into(), json!(host));
        }
        if let Some(port) = port {
            server.insert("port".into(), json!(port));
        }
        if !server.is_empty() {
            root.insert("server".into(), Value::Object(server));
        }
        if let Some(provider) = provider {
            root.insert("providers".into(), json!({ "default": provider }));
        }
    }
    Figment::from(Serialized::defaults(Value::Object(root)))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

/// `stacyvm sandbox ...` and `stacyvm files ...`: the exit status.
async fn client(command: Command) -> Result<u8, stacyvm::cli::CliError> {
    use stacyvm::cli::client;
    match command {
        Command::Sandbox { api, command } => {
            let (target, json) = (api.target(), api.json);
            match command {
                SandboxCommand::Create {
                    image,
                    provider,
                    template,
                    ttl,
                    memory_mb,
                    vcpus,
                    metadata,
                } => {
                    let args = client::CreateArgs {
                        image,
                        provider,
                        template,
                        ttl,
                        memory_mb,
                        vcpus,
                        metadata,
                    };
                    client::create(&target, args, json).await?;
                }
                SandboxCommand::Ls => client::list(&target, json).await?,
                SandboxCommand::Get { id } => client::get(&target, &id, json).await?,
                SandboxCommand::Exec {
                    id,
                    shell,
                    env,
                    workdir,
                    timeout,
                    argv,
                } => {
                    let args = client::ExecArgs {
                        argv,
                        shell,
                        env,
                        workdir,
                        timeout,
                    };
                    // The command's exit code is the CLI's; StacyVM's own
                    // failures exit 125, apart from any command's.
                    return Ok(match client::exec(&target, &id, args, json).await {
                        Ok(code) => code,
                        Err(e) => {
                            eprintln!("stacyvm: {e}");
                            client::CLIENT_FAILED
                        }
                    });
                }
                SandboxCommand::Rm { ids } => client::remove(&target, &ids).await?,
                SandboxCommand::Logs { id, lines } => client::logs(&target, &id, lines).await?,
                SandboxCommand::Extend { id, ttl } => {
                    client::extend(&target, &id, &ttl, json).await?
                }
            }
        }
        Command::Files { api, command } => {
            let (target, json) = (api.target(), api.json);
            match command {
                FilesCommand::Cp { from, to } => client::cp(&target, &from, &to).await?,
                FilesCommand::Ls { path } => client::ls(&target, &path, json).await?,
                FilesCommand::Cat { path } => client::cat(&target, &path).await?,
            }
        }
        _ => return Err(stacyvm::cli::CliError::Other("not a client command".into())),
    }
    Ok(0)
}

async fn run(cli: Cli, config: Config) -> Result<u8, Box<dyn std::error::Error>> {
    match cli.command {
        command @ (Command::Sandbox { .. } | Command::Files { .. }) => {
            return Ok(client(command).await?);
        }
        Command::Shell {
            api,
            id,
            session,
            command,
        } => {
            let command = (!command.is_empty()).then(|| command.join(" "));
            return match stacyvm::cli::shell::shell(
                &api.target(),
                &id,
                session.as_deref(),
                command.as_deref(),
            )
            .await
            {
                Ok(code) => Ok(code),
                Err(e) => {
                    eprintln!("stacyvm: {e}");
                    Ok(1)
                }
            };
        }
        Command::Mcp { api } => stacyvm::cli::mcp::serve_stdio(api.target()).await?,
        Command::Serve { .. } => {
            let listener = app::bind(&config).await?;
            let mut config = config;
            let local = listener.local_addr()?;
            if config.cluster.advertise_url.is_empty() && !local.ip().is_unspecified() {
                // Other replicas reach this one where it listens.
                config.cluster.advertise_url = format!("http://{local}");
            }
            let app = App::start(config.clone()).await?;
            let address = listener.local_addr()?;
            tracing::info!(
                %address,
                playground = %format!("http://{address}/playground"),
                "StacyVM listening"
            );
            app.serve(listener, shutdown_signal()).await?;
        }
        Command::Worker { .. } => app::run_worker(config, shutdown_signal()).await?,
        Command::CustomProvider {
            listen,
            provider,
            api_key,
        } => {
            app::serve_custom_provider(config, &listen, &provider, &api_key, shutdown_signal())
                .await?
        }
        Command::Schema => print!("{}", stacyvm::api::graphql::sdl()),
        Command::Openapi => println!("{}", stacyvm::api::rest::openapi().to_pretty_json()?),
        Command::Bench {
            quick,
            image,
            rootfs,
            json,
            scale,
            subscriptions,
        } => {
            stacyvm::cli::bench::run(stacyvm::cli::bench::BenchOptions {
                quick,
                image,
                rootfs,
                json,
                scale: scale.unwrap_or(if quick { 1000 } else { 10_000 }),
                subscriptions: subscriptions.unwrap_or(if quick { 200 } else { 1000 }),
            })
            .await?;
        }
        Command::Certify {
            provider,
            image,
            json,
        } => {
            let results = app::certify(&config, provider.as_deref(), image.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                print!("{}", stacyvm::cli::certify::table(&results));
            }
            return Ok(if results.iter().all(|r| r.certified) {
                0
            } else {
                1
            });
        }
        Command::Workers {
            server,
            admin_key,
            command,
        } => {
            use stacyvm::cli::{Target, workers};
            let target = Target {
                server,
                admin_key,
                ..Default::default()
            };
            match command {
                WorkersCommand::List => workers::list(&target).await?,
                WorkersCommand::Cordon { id } => {
                    workers::set_state(&target, &id, "cordon", None).await?
                }
                WorkersCommand::Uncordon { id } => {
                    workers::set_state(&target, &id, "uncordon", None).await?
                }
                WorkersCommand::Drain { id, wait, timeout } => {
                    let timeout = stacyvm::duration::parse(&timeout)?;
                    workers::set_state(&target, &id, "drain", wait.then_some(timeout)).await?
                }
            }
        }
        Command::Keys { command } => {
            let store = app::open_store(&config).await?;
            let identity = app::identity(&config, &store).await?;
            match command {
                KeyCommand::Create {
                    owner,
                    role,
                    admin,
                    tenant,
                    expires,
                    allow_user_header,
                } => {
                    let role: stacyvm::auth::Role = if admin {
                        "admin".parse()?
                    } else {
                        role.parse()?
                    };
                    let expires_in = expires
                        .as_deref()
                        .map(stacyvm::duration::parse)
                        .transpose()?;
                    let (key, info) = identity
                        .create_key(stacyvm::service::NewApiKey {
                            owner_id: owner,
                            tenant_id: tenant,
                            role,
                            expires_in,
                            allow_user_header,
                        })
                        .await?;
                    eprintln!(
                        "created key {} ({}) for owner {} with role {}; it is shown only once:",
                        info.id, info.prefix, info.owner_id, info.role
                    );
                    println!("{key}");
                }
                KeyCommand::List => {
                    println!("ID\tPREFIX\tOWNER\tROLE\tCREATED\tEXPIRES\tREVOKED");
                    for k in identity.list_keys().await? {
                        let opt = |t: Option<chrono::DateTime<chrono::Utc>>| {
                            t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
                        };
                        println!(
                            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                            k.id,
                            k.prefix,
                            k.owner_id,
                            k.role,
                            k.created_at.to_rfc3339(),
                            opt(k.expires_at),
                            opt(k.revoked_at)
                        );
                    }
                }
                KeyCommand::Revoke { id_or_prefix } => {
                    let n = identity.revoke_key(&id_or_prefix).await?;
                    println!("revoked {n} key(s)");
                }
            }
        }
        Command::Migrate => {
            let store = app::open_store(&config).await?;
            println!("migrations applied ({})", store.backend_name());
        }
        Command::Image { command } => {
            let images = app::image_store(&config);
            match command {
                ImageCommand::Import { name, tarball } => {
                    let info = images.import(&name, &tarball)?;
                    println!("imported {} ({} bytes)", info.name, info.size_bytes);
                }
                ImageCommand::List => {
                    let list = images.list()?;
                    if list.is_empty() {
                        println!("no images imported (stacyvm image import NAME ROOTFS.tar[.gz])");
                    }
                    for info in list {
                        println!("{}\t{}\t{}", info.name, info.size_bytes, info.imported_at);
                    }
                }
                ImageCommand::Rm { name } => {
                    images.remove(&name)?;
                    println!("removed {name}");
                }
            }
        }
    }
    Ok(0)
}

/// Runs a hidden helper subcommand of the native provider, if that is
/// what was asked for. These run before anything else (no runtime, no
/// thread): joining a user namespace requires a single-threaded process.
/// They are not clap subcommands, so `--help` does not list them.
fn native_helper() -> Option<ExitCode> {
    let mut all = std::env::args_os();
    let argv0 = all.next().unwrap_or_default();
    let args: Vec<std::ffi::OsString> = all.collect();
    // Called as newuidmap/newgidmap through the keeper's shims (see
    // provider::native::ids).
    let name = std::path::Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if matches!(name, "newuidmap" | "newgidmap") {
        let code = stacyvm::provider::native::newidmap_main(name, &args);
        return Some(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)));
    }
    let helper = match args.first().and_then(|a| a.to_str()) {
        Some("__native-init") => stacyvm::provider::native::keeper_main,
        Some("__native-exec") => stacyvm::provider::native::exec_main,
        _ => return None,
    };
    let code = helper(&args[1..]);
    Some(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)))
}

fn main() -> ExitCode {
    if let Some(code) = native_helper() {
        return code;
    }
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), overrides(&cli)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stacyvm: {e}");
            return ExitCode::from(2);
        }
    };
    // One-shot commands (keys, images, workers, migrate) print their answer
    // and only warnings, not the server's start-up log lines.
    let serving = matches!(cli.command, Command::Serve { .. } | Command::Worker { .. });
    let level = if serving || config.logging.level != "info" {
        config.logging.level.clone()
    } else {
        "warn".to_string()
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&level)),
        )
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("stacyvm: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, config)) {
        Ok(code) => ExitCode::from(code),
        // Printed once, without log decoration.
        Err(e) => {
            eprintln!("stacyvm: {e}");
            ExitCode::FAILURE
        }
    }
}
