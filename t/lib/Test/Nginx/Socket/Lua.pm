package Test::Nginx::Socket::Lua;

# Same runner as Test::Nginx::Socket (t/lib/Test/Nginx/Socket.pm), under the
# name ngx_lua test suites use.  See t/README.md.

use Test::Nginx::Socket -Base;

our $VERSION = '0.01';

1;
