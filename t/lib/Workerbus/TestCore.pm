package Workerbus::TestCore;

# The set-up every block-format suite shares, for both block runners: ours
# (t/lib/Test/Nginx/Socket.pm) and the real Test::Nginx (openresty/test-nginx).
# A suite starts with
#
#     use Workerbus::TestCore 'no_plan';
#
# instead of `use Test::Nginx::Socket::Lua 'no_plan';`. It gets everything
# Test::Nginx::Socket::Lua exports (whichever runner comes first in @INC),
# plus the fixtures below. A block preprocessor gives each block:
#
# * `lua_package_path`: t/lib (the Lua helpers of t/lib/wbtest.lua), then
#   TEST_NGINX_LUA_PATH, or this repository's lib/; in front of its
#   http_config, unless the block sets one or no Lua module is loaded. The
#   real runner adds none of its own.
# * an empty `--- config` when the block has none (the real runner refuses a
#   block without one, `must_die` blocks included).
# * the sections below, so that blocks do not repeat the same text.
#
# Sections of our own (both runners ignore unknown sections; they are read
# here, before the runner sees the block):
#
# * `--- zone: NAME SIZE`: `workerbus_zone NAME SIZE;` in front of the
#   block's main_config.
# * `--- shared_dicts: NAME SIZE, NAME SIZE, ...`: one `lua_shared_dict` line
#   each, in front of the block's http_config.
#
# Also set here, for both runners: TEST_NGINX_HTML_DIR (the real runner
# only knows html_dir()) and no_shuffle() (blocks run in file order, as ours
# always does).
#
# Not set here: check_accum_error_log(). The real runner checks error_log
# after each request of a `request eval` list, against the lines since the
# previous check; with it, each check sees all the block has logged so far
# (as ours, which checks once, after the last request). A suite whose
# multi-request blocks expect a line logged during an earlier request calls
# it (t/000, t/002). It is not for every suite: the real runner then reads
# the block's whole log at every check, which under t/103's storms (debug
# level, thousands of lines per request) takes minutes.
#
# Fixtures (Lua text for http_config or config), exported as scalars:
# see Workerbus::Fixtures.

use Test::Nginx::Socket::Lua -Base;

use Cwd ();
use File::Basename ();
use File::Spec ();
use Workerbus::Fixtures ();
use Workerbus::HasLua ();

our $RepoDir = Cwd::abs_path(File::Spec->catdir(
    File::Basename::dirname(File::Spec->rel2abs(__FILE__)), '..', '..', '..'));

our $LuaPath = (defined $ENV{TEST_NGINX_LUA_PATH} && $ENV{TEST_NGINX_LUA_PATH} ne '')
    ? $ENV{TEST_NGINX_LUA_PATH} : "$RepoDir/lib/?.lua;;";

our @EXPORT = (qw($LuaPath $RepoDir), @Workerbus::Fixtures::EXPORT);

# the fixtures, under this package's name too, so that `our @EXPORT` above
# exports them to the suite
for my $name (@Workerbus::Fixtures::EXPORT) {
    (my $var = $name) =~ s/^\$//;
    no strict 'refs';
    *{"Workerbus::TestCore::$var"} = \${"Workerbus::Fixtures::$var"};
}

$ENV{TEST_NGINX_HTML_DIR} //= html_dir();

no_shuffle();

# Does the nginx of this run have Lua? Read when the block runs: a suite may
# change TEST_NGINX_LOAD_MODULES in a BEGIN block.
sub has_lua () {
    my $bin = $ENV{TEST_NGINX_BINARY};
    $bin = 'nginx' if !defined $bin || $bin eq '';
    my @mods = split ' ', $ENV{TEST_NGINX_LOAD_MODULES} // '';
    # ours loads Debian's ndk + lua when the list is empty; the real runner
    # (the one with Test::Nginx::Util) loads nothing then
    @mods = grep { -f } '/usr/lib/nginx/modules/ngx_http_lua_module.so'
        if !@mods && !defined &Test::Nginx::Util::write_config_file;
    return Workerbus::HasLua::has_lua($bin, @mods);
}

sub preprocess ($) {
    my $block = shift;

    my $main = $block->main_config;
    if (defined(my $zone = $block->zone)) {
        $zone =~ s/^\s+|\s+$//g;
        $main = "    workerbus_zone $zone;\n" . ($main // '');
    }
    $block->set_value(main_config => $main) if defined $main;

    my $http = $block->http_config // '';
    if (defined(my $dicts = $block->shared_dicts)) {
        $http = join('', map { "    lua_shared_dict $_;\n" } grep { length }
                     map { s/^\s+|\s+$//gr } split /[,\n]/, $dicts) . $http;
    }
    if ($http !~ /\blua_package_path\b/ && has_lua()) {
        $http = "    lua_package_path \"$RepoDir/t/lib/?.lua;$LuaPath\";\n" . $http;
    }
    $block->set_value(http_config => $http);

    $block->set_value(config => '') unless defined $block->config;
}

add_block_preprocessor(\&preprocess);

1;
