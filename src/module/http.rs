//! What the module's content handlers (status, metrics) share: installing a
//! handler in a location, refusing methods other than GET/HEAD, content
//! negotiation, and sending one in-memory body.

use core::ptr;

use nginx_sys::{
    NGX_HTTP_GET, NGX_HTTP_HEAD, NGX_HTTP_INTERNAL_SERVER_ERROR, NGX_HTTP_NOT_ALLOWED, NGX_OK, ngx_chain_t, ngx_conf_t,
    ngx_http_conf_ctx_t, ngx_http_core_loc_conf_t, ngx_http_handler_pt, ngx_http_request_t, ngx_int_t, ngx_list_part_t,
    ngx_table_elt_t,
};

/// Makes `handler` the content handler of the location being parsed.
pub fn set_handler(cf: *mut ngx_conf_t, handler: unsafe extern "C" fn(*mut ngx_http_request_t) -> ngx_int_t) {
    let h: ngx_http_handler_pt = Some(handler);
    // SAFETY: called from a location directive's handler: cf->ctx is the
    // location's ngx_http_conf_ctx_t, and the core module's loc conf is at its ctx_index.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx_http_conf_ctx_t;
        let clcf = *(*ctx).loc_conf.add(nginx_sys::ngx_http_core_module.ctx_index) as *mut ngx_http_core_loc_conf_t;
        (*clcf).handler = h;
    }
}

/// GET and HEAD only; the request body (if any) is discarded.
pub fn accept_get(r: &mut ngx_http_request_t) -> Result<(), ngx_int_t> {
    if r.method & ((NGX_HTTP_GET | NGX_HTTP_HEAD) as usize) == 0 {
        return Err(NGX_HTTP_NOT_ALLOWED as ngx_int_t);
    }
    // SAFETY: a live request.
    let rc = unsafe { nginx_sys::ngx_http_discard_request_body(r) };
    if rc != NGX_OK as ngx_int_t {
        return Err(rc);
    }
    Ok(())
}

fn bytes(s: &nginx_sys::ngx_str_t) -> &[u8] {
    if s.data.is_null() || s.len == 0 {
        return &[];
    }
    // SAFETY: an ngx_str_t of the live request: data is readable for len bytes.
    unsafe { core::slice::from_raw_parts(s.data, s.len) }
}

/// Value of the request header `name` (ASCII, compared without case).
pub fn header<'a>(r: &'a ngx_http_request_t, name: &[u8]) -> Option<&'a [u8]> {
    let mut part: *const ngx_list_part_t = &r.headers_in.headers.part;
    while !part.is_null() {
        // SAFETY: nginx's list of the live request: each part holds nelts
        // ngx_table_elt_t, and next links the parts.
        let p = unsafe { &*part };
        let elts = p.elts as *const ngx_table_elt_t;
        for i in 0..p.nelts {
            // SAFETY: i < nelts.
            let h = unsafe { &*elts.add(i) };
            if bytes(&h.key).eq_ignore_ascii_case(name) {
                return Some(bytes(&h.value));
            }
        }
        part = p.next;
    }
    None
}

/// `?format=html` / `?format=json` decide; else a browser, whose Accept
/// lists text/html, gets the page and everything else (curl's `*/*`, a
/// script asking for application/json) the JSON.
pub fn wants_html(r: &ngx_http_request_t) -> bool {
    let args = bytes(&r.args);
    for a in args.split(|&b| b == b'&') {
        match a {
            b"format=html" => return true,
            b"format=json" => return false,
            _ => {}
        }
    }
    let Some(accept) = header(r, b"accept") else { return false };
    accept.split(|&b| b == b',').any(|m| {
        let mut parts = m.split(|&b| b == b';');
        let media = parts.next().unwrap_or(&[]);
        // "text/html;q=0" means "not HTML".
        let refused = parts.any(|p| {
            let p = p.trim_ascii();
            p.len() >= 3 && p[..2].eq_ignore_ascii_case(b"q=") && p[2..].iter().all(|&c| c == b'0' || c == b'.')
        });
        media.trim_ascii().eq_ignore_ascii_case(b"text/html") && !refused
    })
}

/// Sends `body` as the whole 200 response.
pub fn send(r: &mut ngx_http_request_t, content_type: &'static str, body: &[u8]) -> ngx_int_t {
    r.headers_out.status = 200;
    r.headers_out.content_length_n = body.len() as _;
    r.headers_out.content_type =
        nginx_sys::ngx_str_t { len: content_type.len(), data: content_type.as_ptr() as *mut u8 };
    r.headers_out.content_type_len = content_type.len();
    // SAFETY: a live request.
    let rc = unsafe { nginx_sys::ngx_http_send_header(r) };
    if rc == nginx_sys::NGX_ERROR as ngx_int_t || rc > NGX_OK as ngx_int_t || r.header_only() != 0 {
        return rc;
    }
    // SAFETY: a buffer from the request pool, freed with the request.
    let b = unsafe { nginx_sys::ngx_create_temp_buf(r.pool, body.len().max(1)) };
    if b.is_null() {
        return NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    }
    // SAFETY: b has room for body.len() bytes from pos.
    unsafe {
        ptr::copy_nonoverlapping(body.as_ptr(), (*b).pos, body.len());
        (*b).last = (*b).pos.add(body.len());
        (*b).set_last_buf(1);
        (*b).set_last_in_chain(1);
    }
    let mut out = ngx_chain_t { buf: b, next: ptr::null_mut() };
    // SAFETY: out lives across the call; the filter chain copies what it keeps.
    unsafe { nginx_sys::ngx_http_output_filter(r, &mut out) }
}
