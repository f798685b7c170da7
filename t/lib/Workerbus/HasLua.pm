package Workerbus::HasLua;

# Whether an nginx runs Lua: compiled in (OpenResty and other builds whose
# `nginx -V` names lua-nginx-module) or loaded with load_module (a module
# file that defines ngx_http_lua_module). Decided from what the binary and
# the files say, not from file names, so a build with Lua compiled in, or a
# Lua module under another name, is seen as such.

use strict;
use warnings;

my %cache;

sub has_lua {
    my ($binary, @modules) = @_;
    my $key = join "\0", $binary, @modules;
    return $cache{$key} //= do {
        my $v = `'$binary' -V 2>&1`;
        my $yes = $v =~ /lua/i ? 1 : 0;
        for my $m (@modules) {
            last if $yes;
            open my $fh, "<:raw", $m or next;
            local $/;
            my $data = <$fh> // "";
            $yes = 1 if index($data, "ngx_http_lua_module") >= 0;
        }
        $yes;
    };
}

1;
