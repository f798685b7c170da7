package Workerbus::OpenResty;

# What an nginx of OpenResty's kind has that Debian's lacks, for suites that
# need it: the privileged agent (OpenResty's nginx patch) and stream-lua.
# Decided from the binary and the module files of the run, as HasLua does:
# `nginx -V` names the modules compiled in; a loaded module file, the ones
# it defines; the patch leaves its process title in the binary.
# Each function returns undef when the nginx has it, else the reason, for
# `skip_all`.

use strict;
use warnings;

sub _binary { my $b = $ENV{TEST_NGINX_BINARY}; defined $b && $b ne '' ? $b : 'nginx' }

sub _file_has {
    my ($path, $needle) = @_;
    open my $fh, "<:raw", $path or return 0;
    local $/;
    my $data = <$fh> // "";
    return index($data, $needle) >= 0;
}

sub _path_of {
    my $b = shift;
    return $b if $b =~ m{/};
    for my $d (split /:/, $ENV{PATH} // '') {
        return "$d/$b" if -x "$d/$b";
    }
    return $b;
}

# undef, or why this nginx runs no privileged agent.
sub no_privileged_agent {
    my $bin = _binary();
    return undef if _file_has(_path_of($bin), "privileged agent process");
    return "$bin has no privileged agent (OpenResty's privileged_agent_process patch; "
         . "Debian's nginx lacks it): build an OpenResty-equivalent nginx to run this suite";
}

# undef, or why this nginx runs no Lua in its stream subsystem.
sub no_stream_lua {
    my $bin = _binary();
    my $v = `'$bin' -V 2>&1`;
    return undef if $v =~ /stream-lua-nginx-module|stream_lua/;
    for my $m (split ' ', $ENV{TEST_NGINX_LOAD_MODULES} // '') {
        return undef if _file_has($m, "ngx_stream_lua_module");
    }
    return "$bin has no stream-lua-nginx-module (Debian packages none): "
         . "build an OpenResty-equivalent nginx to run this suite";
}

1;
