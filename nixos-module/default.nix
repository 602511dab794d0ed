# NixOS module for tvixfs: the FUSE mount (services.tvixfs), the gRPC store daemon
# (services.tvixfs.daemon) and the Nix binary cache (services.tvixfs.narBridge). The units it
# makes match systemd/tvixfs.service, systemd/tvixfs-daemon.service and
# systemd/tvixfs-nar-bridge.service; tests/test_systemd_units_and_nixos_module.py keeps them equal.
#
#   imports = [ /path/to/tvixfs/nixos-module ];
#   nixpkgs.overlays = [ (final: prev: { tvixfs = final.callPackage ./tvixfs.nix { }; }) ];
#   services.tvixfs.enable = true;
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.services.tvixfs;
  dcfg = cfg.daemon;
  bcfg = cfg.narBridge;
  inherit (lib)
    mkOption
    mkEnableOption
    mkPackageOption
    mkIf
    mkMerge
    types
    literalExpression
    optional
    optionals
    concatMap
    hasPrefix
    removePrefix
    ;

  exe = lib.getExe' cfg.package "tvixfs";
  execArgs = utils.escapeSystemdExecArgs;

  # "unix:/run/x.sock" -> null; "[::]:8000", "0.0.0.0:8000", "host:8000" -> { host; port; }
  parseListen =
    addr:
    let
      m = builtins.match "(.*):([0-9]+)" addr;
    in
    if hasPrefix "unix:" addr || m == null then
      null
    else
      {
        host = builtins.elemAt m 0;
        port = lib.toInt (builtins.elemAt m 1);
      };
  tcpListeners = builtins.filter (l: l != null) (map parseListen dcfg.listen);
  loopbackHosts = [
    "[::1]"
    "localhost"
  ];
  isLoopback = host: builtins.elem host loopbackHosts || hasPrefix "127." host;
  firewallPorts = lib.unique (map (l: l.port) (builtins.filter (l: !isLoopback l.host) tcpListeners));
  badListeners = builtins.filter (
    l: !(hasPrefix "unix:/" l || parseListen l != null)
  ) dcfg.listen;

  # "unix:/p" and its URL form "unix:///p" -> "/p"
  socketPath =
    addr:
    let
      p = removePrefix "unix:" addr;
    in
    if hasPrefix "///" p then removePrefix "//" p else p;

  # URLs under which the daemon reaches itself: serving them would make every request a loop.
  selfURLs =
    map (l: "grpc+unix://${socketPath l}") (builtins.filter (hasPrefix "unix:") dcfg.listen)
    ++ concatMap (
      l:
      map (h: "grpc+http://${h}:${toString l.port}") (
        [ l.host ] ++ optionals (l.host == "[::]" || l.host == "0.0.0.0" || isLoopback l.host) (
          loopbackHosts ++ [ "127.0.0.1" ]
        )
      )
    ) tcpListeners;

  localStorePath = url: if hasPrefix "local://" url then removePrefix "local://" url else null;

  # The disk cache serves remote stores only (the CLI ignores it for local:// and memory://).
  remoteMount = builtins.any (url: url != null && hasPrefix "grpc+" url) [
    cfg.store
    cfg.blobServiceAddr
    cfg.directoryServiceAddr
    cfg.pathInfoServiceAddr
  ];
  diskCache = cfg.diskCache;
  defaultCacheDirectory = "/var/cache/tvixfs";
  daemonStatePath = localStorePath dcfg.store;
  bridgeStatePath = localStorePath bcfg.store;

  # What both services get: no new privileges, native system calls only, no W+X memory, ...
  commonHardening = {
    NoNewPrivileges = true;
    DevicePolicy = "closed";
    SystemCallArchitectures = "native";
    SystemCallErrorNumber = "EPERM";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    ProtectClock = true;
    ProtectHostname = true;
  };

  # See systemd/tvixfs.service for why nothing here may create a mount namespace: the FUSE
  # mount would stay inside it, invisible to the host.
  mountHardening = commonHardening // {
    CapabilityBoundingSet = "CAP_SYS_ADMIN CAP_DAC_OVERRIDE";
    DeviceAllow = "/dev/fuse rw";
    SystemCallFilter = "@system-service @mount";
    RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6 AF_NETLINK";
  };

  # The daemon mounts nothing: it also gets a private, mostly read-only file system view.
  daemonHardening = commonHardening // {
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    PrivateUsers = true;
    PrivateIPC = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    RemoveIPC = true;
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
    RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6";
  };

  serviceAddrOption =
    service:
    mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "grpc+http://store.example.org:8000";
      description = "URL of the ${service}, if not that of {option}`services.tvixfs.store`.";
    };

  # [ flag value ] when the option is set, nothing when it is null.
  flagIfSet =
    flag: value:
    optionals (value != null) [
      flag
      value
    ];

  mountArgs =
    [
      exe
      "mount"
      "--store"
      cfg.store
    ]
    ++ flagIfSet "--blob-service-addr" cfg.blobServiceAddr
    ++ flagIfSet "--directory-service-addr" cfg.directoryServiceAddr
    ++ flagIfSet "--path-info-service-addr" cfg.pathInfoServiceAddr
    ++ optional cfg.allowOther "--allow-other"
    ++ optional cfg.listRoot "--list-root"
    ++ flagIfSet "--cache-size" cfg.cacheSize
    ++ optionals (diskCache.enable && remoteMount) [
      "--disk-cache"
      diskCache.directory
      "--disk-cache-size"
      diskCache.size
    ]
    ++ concatMap (k: [
      "--trusted-public-key"
      k
    ]) cfg.trustedPublicKeys
    ++ cfg.extraArgs
    ++ [ cfg.mountPoint ];

  # Detach a dead mount after a crash, but only if it is ours: on NixOS /nix/store is usually a
  # read-only bind mount of the real store, which a failed start must leave alone.
  unmountScript = ''if ${pkgs.util-linux}/bin/findmnt --mountpoint "$1" --types fuse.tvixfs >/dev/null; then exec ${pkgs.util-linux}/bin/umount --lazy "$1"; fi'';
in
{
  options.services.tvixfs = {
    enable = mkEnableOption "a read-only FUSE mount of a tvix-protocol store (by default at /nix/store)";

    package = mkPackageOption pkgs "tvixfs" { };

    mountPoint = mkOption {
      type = types.str;
      default = "/nix/store";
      example = "/mnt/tvix-store";
      description = ''
        Where to mount the store: an existing or creatable directory that nothing is mounted
        on. The default replaces the machine's /nix/store, as on a diskless or netbooted
        machine whose whole store lives in a tvix store; on an ordinary NixOS installation,
        whose system lives in (a read-only bind mount of) /nix/store, mount somewhere else.
      '';
    };

    store = mkOption {
      type = types.str;
      default = "local:///var/lib/tvixfs";
      example = "grpc+http://cache.example.org:8000";
      description = ''
        The store to mount: `local:///path` (the embedded store), `grpc+http://host:port` or
        `grpc+unix:///path.sock` (a tvixfs daemon, tvix-store or snix-store). A remote store
        is why the mount waits for network-online.target.
      '';
    };

    blobServiceAddr = serviceAddrOption "BlobService";
    directoryServiceAddr = serviceAddrOption "DirectoryService";
    pathInfoServiceAddr = serviceAddrOption "PathInfoService";

    listRoot = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether `ls` of the mount point lists every store path. Off, store paths still appear
        when looked up by name, and a huge store costs nothing to list.
      '';
    };

    allowOther = mkOption {
      type = types.bool;
      default = cfg.mountPoint == "/nix/store";
      defaultText = literalExpression ''config.services.tvixfs.mountPoint == "/nix/store"'';
      description = "Whether users other than root may access the mount.";
    };

    cacheSize = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "1G";
      description = "Size of the in-memory cache of file chunks; null keeps the built-in default.";
    };

    diskCache = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Whether a remote store's data (chunks, directories, path infos; all verified) is kept
          on disk, so that a restart fetches nothing again and the mount starts and keeps
          serving what it holds while the store is unreachable. Not used for a local store.
        '';
      };

      directory = mkOption {
        type = types.str;
        default = defaultCacheDirectory;
        description = "Where the disk cache lives; the default is the service's CacheDirectory.";
      };

      size = mkOption {
        type = types.str;
        default = "10G";
        example = "50G";
        description = ''
          Most the disk cache may hold (plus its SQLite index); the least recently used data
          goes first, down to half of it.
        '';
      };
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "cache.example.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      description = ''
        Public keys in Nix's `name:base64` form. When any are given, a store path appears in
        the mount only if one of them signed it, root node included (`--sign-key` of the
        importers and of the daemon); when none are, signatures are not checked.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--verbose" ];
      description = "Further arguments to `tvixfs mount`.";
    };

    daemon = {
      enable = mkEnableOption "the tvixfs daemon, serving a store over gRPC";

      listen = mkOption {
        type = types.listOf types.str;
        default = [
          "unix:/run/tvixfs/daemon.sock"
          "[::1]:8000"
        ];
        example = [
          "unix:/run/tvixfs/daemon.sock"
          "[::]:8000"
        ];
        description = ''
          Addresses to serve on: `unix:/absolute/path` or `host:port` (`[::]:port` for every
          address). Ports below 1024 are not possible: the daemon has no capabilities.
        '';
      };

      store = mkOption {
        type = types.str;
        default = "local:///var/lib/tvixfs";
        example = "grpc+http://upstream.example.org:8000";
        description = "The store the daemon serves.";
      };

      environmentFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/tvixfs-daemon.env";
        description = ''
          A file of `NAME=value` lines for the daemon's environment, read when it starts: the
          credentials of an `s3://` store (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
          optionally `AWS_SESSION_TOKEN`). A string, not a Nix path: the file stays outside the
          Nix store, so no secret is copied into it.
        '';
      };

      openFirewall = mkOption {
        type = types.bool;
        default = false;
        description = "Whether to open the TCP ports of the non-loopback {option}`services.tvixfs.daemon.listen` addresses.";
      };
    };

    narBridge = {
      enable = mkEnableOption "the tvixfs nar-bridge, serving a store as a Nix HTTP binary cache";

      listen = mkOption {
        type = types.str;
        default = "127.0.0.1:9000";
        example = "unix:/run/tvixfs-nar-bridge/http.sock";
        description = ''
          Address to serve on: `host:port` or `unix:/absolute/path`. The bridge has no
          authentication: expose it beyond loopback only behind a proxy or on a trusted network.
        '';
      };

      store = mkOption {
        type = types.str;
        default = "local:///var/lib/tvixfs";
        example = "grpc+unix:///run/tvixfs/daemon.sock";
        description = "The store the bridge serves (and, with {option}`allowUpload`, writes to).";
      };

      allowUpload = mkOption {
        type = types.bool;
        default = false;
        description = "Whether to accept uploads (`nix copy --to http://...`); reading is always open.";
      };

      signKeyFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/etc/tvixfs/cache.sec";
        description = "Nix secret key file (readable by user tvixfs): every narinfo served is signed with it.";
      };

      trustedPublicKeys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "builder-1:AAAA...=" ];
        description = "If not empty, an upload needs a valid signature by one of these keys (else 403).";
      };

      priority = mkOption {
        type = types.int;
        default = 40;
        description = "The `Priority` in nix-cache-info: lower is preferred by Nix clients.";
      };

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "--max-nar-size" "1073741824" ];
        description = "Further arguments to `tvixfs nar-bridge`.";
      };
    };
  };

  config = mkMerge [
    (mkIf (cfg.enable || dcfg.enable || bcfg.enable) {
      environment.systemPackages = [ cfg.package ];
    })

    (mkIf cfg.enable {
      assertions = [
        {
          assertion = hasPrefix "/" cfg.mountPoint;
          message = "services.tvixfs.mountPoint must be an absolute path, not `${cfg.mountPoint}`.";
        }
      ];

      systemd.services.tvixfs = {
        description = "tvixfs: ${cfg.mountPoint} read-only over FUSE";
        wantedBy = [ "multi-user.target" ];
        # fusermount3, which libfuse runs to unmount after a crash (auto_unmount).
        path = [ pkgs.fuse3 ];
        # A remote store must be reachable before the mount reports READY=1.
        wants = [ "network-online.target" ];
        after = [
          "network-online.target"
          "tvixfs-daemon.service"
        ];
        # Nix must find its store mounted when it starts. Not before nix-daemon.socket: sockets
        # start before basic.target, which this service follows (an ordering cycle).
        before = optional (cfg.mountPoint == "/nix/store") "nix-daemon.service";
        unitConfig.RequiresMountsFor = [
          (dirOf cfg.mountPoint)
        ] ++ optional (localStorePath cfg.store != null) (localStorePath cfg.store);
        serviceConfig = mountHardening // {
          Type = "notify";
          NotifyAccess = "main";
          ExecStartPre = execArgs [
            "${pkgs.coreutils}/bin/mkdir"
            "-p"
            cfg.mountPoint
          ];
          ExecStart = execArgs mountArgs;
          ExecStopPost =
            "-"
            + execArgs [
              pkgs.runtimeShell
              "-c"
              unmountScript
              "sh"
              cfg.mountPoint
            ];
          KillMode = "mixed";
          Restart = "on-failure";
          RestartSec = "2s";
          TimeoutStartSec = "90s";
          TimeoutStopSec = "30s";
          WatchdogSec = "30s";
          OOMScoreAdjust = -500;
        }
        # Only created: without DynamicUser or RootDirectory this needs no mount namespace.
        // lib.optionalAttrs (diskCache.enable && diskCache.directory == defaultCacheDirectory) {
          CacheDirectory = "tvixfs";
          CacheDirectoryMode = "0700";
        };
      };
    })

    (mkIf dcfg.enable {
      assertions = [
        {
          assertion = dcfg.listen != [ ];
          message = "services.tvixfs.daemon.listen must name at least one address.";
        }
        {
          assertion = badListeners == [ ];
          message = "services.tvixfs.daemon.listen: not `unix:/path` or `host:port`: ${builtins.concatStringsSep ", " badListeners}.";
        }
        {
          assertion = dcfg.openFirewall -> firewallPorts != [ ];
          message = "services.tvixfs.daemon.openFirewall is set, but the daemon listens only on unix sockets or loopback addresses: there is no port to open.";
        }
        {
          assertion = !(builtins.elem dcfg.store selfURLs);
          message = "services.tvixfs.daemon.store `${dcfg.store}` is the daemon itself: every request would loop back to it.";
        }
      ];

      users.users.tvixfs = {
        isSystemUser = true;
        group = "tvixfs";
        home = "/var/lib/tvixfs";
        description = "tvixfs store daemon";
      };
      users.groups.tvixfs = { };

      networking.firewall.allowedTCPPorts = mkIf dcfg.openFirewall firewallPorts;

      systemd.services.tvixfs-daemon = {
        description = "tvixfs daemon: ${dcfg.store} over gRPC";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" ];
        serviceConfig =
          daemonHardening
          // {
            Type = "notify";
            NotifyAccess = "main";
            User = "tvixfs";
            Group = "tvixfs";
            StateDirectory = "tvixfs";
            StateDirectoryMode = "0750";
            RuntimeDirectory = "tvixfs";
            RuntimeDirectoryMode = "0755";
            UMask = "0027";
            ExecStart = execArgs (
              [
                exe
                "daemon"
                "--store"
                dcfg.store
              ]
              ++ concatMap (l: [
                "--listen"
                l
              ]) dcfg.listen
            );
            KillMode = "mixed";
            Restart = "on-failure";
            RestartSec = "2s";
            TimeoutStartSec = "60s";
            TimeoutStopSec = "30s";
            WatchdogSec = "30s";
          }
          // lib.optionalAttrs (dcfg.environmentFile != null) { EnvironmentFile = dcfg.environmentFile; }
          # ProtectSystem=strict leaves only the state directory writable.
          // lib.optionalAttrs (
            daemonStatePath != null && daemonStatePath != "/var/lib/tvixfs"
          ) { ReadWritePaths = [ daemonStatePath ]; };
      };
    })

    (mkIf bcfg.enable {
      users.users.tvixfs = {
        isSystemUser = true;
        group = "tvixfs";
        home = "/var/lib/tvixfs";
        description = "tvixfs store daemon";
      };
      users.groups.tvixfs = { };

      systemd.services.tvixfs-nar-bridge = {
        description = "tvixfs nar-bridge: ${bcfg.store} as a Nix binary cache";
        wantedBy = [ "multi-user.target" ];
        after = [
          "network.target"
          "tvixfs-daemon.service"
        ];
        serviceConfig =
          daemonHardening
          // {
            Type = "notify";
            NotifyAccess = "main";
            User = "tvixfs";
            Group = "tvixfs";
            StateDirectory = "tvixfs";
            StateDirectoryMode = "0750";
            RuntimeDirectory = "tvixfs-nar-bridge";
            RuntimeDirectoryMode = "0755";
            UMask = "0027";
            ExecStart = execArgs (
              [
                exe
                "nar-bridge"
                "--store"
                bcfg.store
                "--listen"
                bcfg.listen
                "--priority"
                (toString bcfg.priority)
              ]
              ++ optional bcfg.allowUpload "--allow-upload"
              ++ flagIfSet "--sign-key" bcfg.signKeyFile
              ++ concatMap (k: [
                "--trusted-public-key"
                k
              ]) bcfg.trustedPublicKeys
              ++ bcfg.extraArgs
            );
            KillMode = "mixed";
            Restart = "on-failure";
            RestartSec = "2s";
            TimeoutStartSec = "60s";
            TimeoutStopSec = "30s";
          }
          # ProtectSystem=strict leaves only the state directory writable.
          // lib.optionalAttrs (
            bridgeStatePath != null && bridgeStatePath != "/var/lib/tvixfs"
          ) { ReadWritePaths = [ bridgeStatePath ]; };
      };
    })
  ];
}
