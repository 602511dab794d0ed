# A stand-in for the few parts of nixpkgs' `lib` that nixos-module/default.nix uses, so that the
# module can be evaluated in tests without nixpkgs (there is no network to fetch it). Names and
# argument orders are nixpkgs'; behaviour is cut down to what the module needs. The module
# itself is written against the real lib and runs on NixOS unchanged.
let
  b = builtins;
in
rec {
  mkOption = attrs: attrs // { _type = "option"; };

  mkEnableOption =
    name:
    mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
    };

  mkPackageOption =
    pkgs: name: _:
    mkOption {
      type = types.package;
      default = pkgs.${name};
      defaultText = literalExpression "pkgs.${name}";
      description = "The ${name} package to use.";
    };

  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };

  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };

  types = {
    bool = {
      name = "bool";
      check = b.isBool;
    };
    int = {
      name = "int";
      check = b.isInt;
    };
    str = {
      name = "str";
      check = b.isString;
    };
    package = {
      name = "package";
      check = x: b.isString x || (b.isAttrs x && x ? outPath);
    };
    listOf = t: {
      name = "listOf ${t.name}";
      check = x: b.isList x && b.all t.check x;
    };
    nullOr = t: {
      name = "nullOr ${t.name}";
      check = x: x == null || t.check x;
    };
  };

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };
  concatMap = f: xs: b.concatLists (map f xs);
  hasPrefix = prefix: s: b.substring 0 (b.stringLength prefix) s == prefix;
  removePrefix =
    prefix: s:
    let
      n = b.stringLength prefix;
    in
    if hasPrefix prefix s then b.substring n (b.stringLength s - n) s else s;
  # Decimal digits only, like the module's callers; leading zeros dropped (JSON forbids them).
  toInt = s: b.fromJSON (b.head (b.match "0*([0-9]+)" s));
  unique = b.foldl' (acc: x: if b.elem x acc then acc else acc ++ [ x ]) [ ];
  getExe' = pkg: name: "${pkg}/bin/${name}";
}
