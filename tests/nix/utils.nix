# Stand-in for the `utils` module argument of NixOS (nixos/lib/utils.nix): only the quoting of
# ExecStart= arguments. JSON quoting is a valid systemd quoting; "%" and "$" are doubled so that
# systemd expands neither specifiers nor environment variables inside an argument.
{
  escapeSystemdExecArgs = args: builtins.concatStringsSep " " (
    map (arg: builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON arg)) args
  );
}
