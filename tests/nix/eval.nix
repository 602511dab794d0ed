# Evaluates nixos-module/default.nix the way the NixOS module system would for one
# configuration, cut down to what the module needs: option values are the given settings or the
# defaults (type-checked, unknown names rejected), and the module's `config` is resolved through
# mkIf/mkMerge (attribute sets merged, lists concatenated, equal scalars accepted).
#   nix-instantiate --eval --strict --json tests/nix/eval.nix --argstr settings '{"enable":true}'
# `settings` is the JSON of services.tvixfs.
{
  settings ? "{}",
}:
let
  b = builtins;
  lib = import ./lib.nix;
  utils = import ./utils.nix;
  pkgs = {
    tvixfs = "/nix/store/00000000000000000000000000000000-tvixfs-0.1.0";
    util-linux = "/nix/store/11111111111111111111111111111111-util-linux-2.39";
    coreutils = "/nix/store/22222222222222222222222222222222-coreutils-9.4";
    fuse3 = "/nix/store/33333333333333333333333333333333-fuse-3.16.2";
    runtimeShell = "/nix/store/44444444444444444444444444444444-bash-5.2/bin/bash";
  };

  isType = t: x: b.isAttrs x && (x._type or null) == t;
  absent = {
    _type = "absent";
  };

  # Option tree + user settings -> values. `where` names the option path for error messages.
  values =
    where: options: given:
    let
      unknown = b.filter (n: !(options ? ${n})) (b.attrNames given);
      value =
        name: opt:
        let
          v = given.${name} or opt.default;
        in
        if opt.type.check v then v else throw "${where}.${name}: not a ${opt.type.name}";
    in
    if unknown != [ ] then
      throw "${where}: no such option: ${b.concatStringsSep ", " unknown}"
    else
      b.mapAttrs (
        name: opt:
        if isType "option" opt then value name opt else values "${where}.${name}" opt (given.${name} or { })
      ) options;

  docs =
    where: options:
    b.concatLists (
      b.attrValues (
        b.mapAttrs (
          name: opt:
          if isType "option" opt then
            [
              {
                name = "${where}.${name}";
                type = opt.type.name;
                description = opt.description or "";
              }
            ]
          else
            docs "${where}.${name}" opt
        ) options
      )
    );

  merge =
    x: y:
    if isType "absent" x then
      y
    else if isType "absent" y then
      x
    else if b.isAttrs x && b.isAttrs y then
      b.zipAttrsWith (_: vs: b.foldl' merge absent vs) [
        x
        y
      ]
    else if b.isList x && b.isList y then
      x ++ y
    else if x == y then
      x
    else
      throw "conflicting definitions: ${b.toJSON x} and ${b.toJSON y}";

  resolve =
    x:
    if isType "if" x then
      (if x.condition then resolve x.content else absent)
    else if isType "merge" x then
      b.foldl' merge absent (map resolve x.contents)
    else if b.isAttrs x then
      removeAbsent (b.mapAttrs (_: resolve) x)
    else
      x;
  removeAbsent = attrs: b.removeAttrs attrs (b.filter (n: isType "absent" attrs.${n}) (b.attrNames attrs));

  module = import ../../nixos-module/default.nix {
    inherit config lib pkgs utils;
  };
  config.services.tvixfs = values "services.tvixfs" module.options.services.tvixfs (b.fromJSON settings);
  resolved = resolve module.config;
  out = if isType "absent" resolved then { } else resolved;
in
{
  config = out;
  failedAssertions = map (a: a.message) (b.filter (a: !a.assertion) (out.assertions or [ ]));
  options = docs "services.tvixfs" module.options.services.tvixfs;
}
